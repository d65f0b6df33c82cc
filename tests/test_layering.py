"""The package's layers: a module imports only from its own layer or the ones below, never in a cycle.

The layers are written out here, lowest first, so that a new module has to be placed
deliberately (the test names any module it does not know). Imports inside functions count
(a lazy import is still a dependency); imports under `if TYPE_CHECKING:` do not.

The core reaches the strategies only through `state.strategy`: prepare, steps, checkpoint and
the callbacks never name a strategy, never `hasattr`-sniff a wrapper, and the callbacks use
only public names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
# (folder, package name) of the installed packages: trainloop.callbacks lives in callbacks/.
PACKAGES = ((REPO / "trainloop", "trainloop"), (REPO / "callbacks", "trainloop.callbacks"))

LAYERS: list[set[str]] = [
    # 0: no trainloop imports at all
    {"trainloop._version", "trainloop.errors", "trainloop.settings", "trainloop.callbacks.base",
     "trainloop.forwarding", "trainloop.data", "trainloop.topology", "trainloop.worker",
     "trainloop.checkpoint_files", "trainloop.checkpoint_staging"},
    # 1: the precision policy's wrapper (a forwarding one)
    {"trainloop.precision"},
    # 2: the run's record
    {"trainloop.state"},
    # 3: what the strategies and the core build on
    {"trainloop.collectives", "trainloop.distcp", "trainloop.mesh", "trainloop.tensor_parallel",
     "trainloop.batch_size"},
    # 4: the strategies, each behind trainloop.strategies.base.Strategy
    {"trainloop.strategies", "trainloop.strategies.base", "trainloop.strategies.local",
     "trainloop.strategies.ddp", "trainloop.strategies.fsdp", "trainloop.strategies.meta_init",
     "trainloop.strategies.blocks"},
    # 5: the run's settings: its own, and the records the strategies own (config.ddp, ...)
    {"trainloop.config"},
    # 6: the core functions
    {"trainloop.steps", "trainloop.prepare", "trainloop.checkpoint", "trainloop.weights"},
    # 7: the callbacks, on the public API
    {"trainloop.callbacks", "trainloop.callbacks.checkpoint", "trainloop.callbacks.precision",
     "trainloop.callbacks.progress", "trainloop.callbacks.trackers", "trainloop.callbacks.profile",
     "trainloop.callbacks.throughput"},
    # 8: starting and ending a run (init attaches LossScale)
    {"trainloop.lifecycle"},
    # 9: the front door, the launcher and the tools
    {"trainloop", "trainloop.spawn", "trainloop.__main__", "trainloop.env"},
]
# trainloop.bigmodel is a package of its own on top of torch: its modules import only each other.
BIGMODEL_LAYER = 3

# What the old code sniffed wrappers and shards by (`hasattr(inner, "set_requires_gradient_sync")`).
WRAPPER_ATTRIBUTES = ("set_requires_gradient_sync", "full_tensor", "to_local", "no_sync", "_orig_mod",
                      "module", "device_mesh", "placements", "reshard", "unshard")
STRATEGY_TYPES = ("DistributedDataParallel", "FSDPModule", "DTensor")
CORE = ("trainloop/prepare.py", "trainloop/steps.py", "trainloop/checkpoint.py",
        "callbacks/precision.py", "callbacks/checkpoint.py")


def layer_of(module: str) -> int:
    if module.startswith("trainloop.bigmodel"):
        return BIGMODEL_LAYER
    for index, members in enumerate(LAYERS):
        if module in members:
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layering.py")


def module_files() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES:
        for file in folder.rglob("*.py"):
            parts = list(file.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = file
    return found


def trainloop_imports(source: str, known: set[str]) -> set[str]:
    """The trainloop modules `source` imports, lazily or not, outside `if TYPE_CHECKING:`."""
    tree = ast.parse(source)
    type_only = {id(node) for block in ast.walk(tree)
                 if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                 for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "trainloop":
            for alias in node.names:  # `from trainloop import precision` imports a module
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "trainloop"}
    return found


def upward_imports(modules: dict[str, str]) -> list[str]:
    """'a imports b' for each import of a module from a higher layer."""
    known = set(modules)
    return [f"{module} (layer {layer_of(module)}) imports {imported} (layer {layer_of(imported)})"
            for module, source in sorted(modules.items())
            for imported in sorted(trainloop_imports(source, known))
            if layer_of(imported) > layer_of(module)]


def import_cycles(modules: dict[str, str]) -> list[list[str]]:
    known = set(modules)
    graph = {module: trainloop_imports(source, known) - {module} for module, source in modules.items()}
    graph = {module: {i for i in imported if not module.startswith(i + ".")}  # a package's own __init__
             for module, imported in graph.items()}
    cycles, done, path = [], set(), []

    def visit(module: str) -> None:
        if module in path:
            cycles.append(path[path.index(module):] + [module])
            return
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    return cycles


@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
    return {module: file.read_text() for module, file in module_files().items()}


def test_every_module_is_in_a_layer(sources):
    for module in sources:
        layer_of(module)


def test_no_module_imports_a_higher_layer(sources):
    assert upward_imports(sources) == []


def test_no_import_cycles(sources):
    assert import_cycles(sources) == []


def test_the_checks_catch_an_upward_import_and_a_cycle(sources):
    """The checker itself can fail: the old checkpoint -> prepare -> fsdp -> checkpoint tangle."""
    tangled = {**sources,
               "trainloop.strategies.fsdp": "from trainloop.checkpoint import CheckpointError\n",
               "trainloop.checkpoint": "def f():\n    from trainloop.strategies import fsdp\n",
               "trainloop.state": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                  "    from trainloop.lifecycle import init\n"}
    assert upward_imports(tangled) == [
        "trainloop.strategies.fsdp (layer 4) imports trainloop.checkpoint (layer 6)"]
    assert ["trainloop.checkpoint", "trainloop.strategies.fsdp", "trainloop.checkpoint"] in import_cycles(tangled)


def strategy_branches(source: str) -> list[str]:
    """What in `source` names a strategy, sniffs a wrapper or names a strategy's types."""
    tree = ast.parse(source)
    named = [node.value for node in ast.walk(tree)
             if isinstance(node, ast.Constant) and node.value in ("ddp", "fsdp", "auto", "local")]
    sniffed = [ast.unparse(node) for node in ast.walk(tree)
               if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "hasattr"
               and len(node.args) == 2 and getattr(node.args[1], "value", None) in WRAPPER_ATTRIBUTES]
    types = [ast.unparse(node) for node in ast.walk(tree)
             if (isinstance(node, ast.Attribute) and node.attr in STRATEGY_TYPES)
             or (isinstance(node, ast.Name) and node.id in STRATEGY_TYPES)]
    return named + sniffed + types


@pytest.mark.parametrize("path", CORE)
def test_the_core_never_names_a_strategy_or_sniffs_a_wrapper(path):
    source = (REPO / path).read_text()
    assert strategy_branches(source) == [], f"{path} branches on a strategy: use state.strategy"
    # The manifest records the setting, and an error message quotes it: nothing else reads it.
    mentions = [ast.unparse(node) for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.Attribute) and node.attr == "strategy"
                and ast.unparse(node.value).endswith("config")]
    assert all(m == "state.config.strategy" for m in mentions)


def test_the_branch_check_catches_what_the_core_did_before_the_seam():
    old = ("if state.config.strategy == 'fsdp':\n    from trainloop import fsdp\n"
           "if hasattr(inner, 'set_requires_gradient_sync'):\n    pass\n"
           "wrapped = isinstance(inner, nn.parallel.DistributedDataParallel)\n")
    assert sorted(strategy_branches(old)) == sorted([
        "fsdp", "hasattr(inner, 'set_requires_gradient_sync')", "nn.parallel.DistributedDataParallel"])


def test_callbacks_use_only_public_names(sources):
    for module, source in sources.items():
        if not module.startswith("trainloop.callbacks"):
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trainloop"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{module} imports private {private} from {node.module}"
                assert not node.module.startswith(("trainloop.strategies", "trainloop.distcp")), \
                    f"{module} reaches into {node.module}: use state.strategy or the public API"
