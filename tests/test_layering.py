"""The package's layers: a module imports only from its own layer or the ones below, never in a cycle.

The layers are written out here, lowest first, by module or by package (a package's modules share
its layer unless one of them is named on its own), so that a new module has to be placed
deliberately (the test names any module it does not know). Imports inside functions count (a
lazy import is still a dependency); imports under `if TYPE_CHECKING:` do not. Importing
`a.b.c` also runs the package `a.b`'s `__init__`, so it counts as importing `a.b` too (the root
`trainloop` excepted: it is the front door, and runs first whatever is imported).

The core reaches the strategies only through `state.strategy`: preparation, steps, checkpoint and
the callbacks never name a strategy, never `hasattr`-sniff a wrapper. The callbacks use only the
public API (`trainloop`'s own names), the protocol (`trainloop.hooks`) and the surface for
callback authors (`trainloop.extension`). Training code never imports `trainloop.bigmodel`.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
# (folder, package name) of the installed packages: trainloop.callbacks lives in callbacks/
# (trainloop/callbacks is a symbolic link to it, which rglob does not follow).
PACKAGES = ((REPO / "trainloop", "trainloop"), (REPO / "callbacks", "trainloop.callbacks"))

LAYERS: list[set[str]] = [
    # 0: foundations: how a setting is declared, errors, the callback protocol, topology, the
    #    wrapper walk, data, what trainloop does to models themselves (meta-init, Hugging Face
    #    conventions, weights)
    {"trainloop._version", "trainloop.errors", "trainloop.settings", "trainloop.hooks", "trainloop.forwarding",
     "trainloop.topology", "trainloop.worker", "trainloop.data", "trainloop.models"},
    # 1: the precision policy's wrapper (a forwarding one)
    {"trainloop.precision"},
    # 2: the run's record
    {"trainloop.state"},
    # 3: what the strategies and the core build on; big-model inference, on torch and models
    {"trainloop.collectives", "trainloop.strategies.mesh", "trainloop.strategies.tensor_parallel",
     "trainloop.strategies.blocks", "trainloop.data.batch_size", "trainloop.bigmodel"},
    # 4: the strategies, each behind trainloop.strategies.base.Strategy
    {"trainloop.strategies"},
    # 5: the run's settings: its own, and the records the strategies own (config.ddp, ...)
    {"trainloop.config"},
    # 6: the core functions
    {"trainloop.steps", "trainloop.optimizers", "trainloop.preparation", "trainloop.checkpoint"},
    # 7: the whole surface for callback authors beside the public API
    {"trainloop.extension"},
    # 8: the callbacks, on the public API, the protocol and the extension surface
    {"trainloop.callbacks"},
    # 9: starting and ending a run (init attaches LossScale)
    {"trainloop.lifecycle"},
    # 10: the front door, the launcher and the tools
    {"trainloop", "trainloop.spawn", "trainloop.__main__", "trainloop.env"},
]

# What the old code sniffed wrappers and shards by (`hasattr(inner, "set_requires_gradient_sync")`).
WRAPPER_ATTRIBUTES = ("set_requires_gradient_sync", "full_tensor", "to_local", "no_sync", "_orig_mod",
                      "module", "device_mesh", "placements", "reshard", "unshard")
STRATEGY_TYPES = ("DistributedDataParallel", "FSDPModule", "DTensor")
CORE = ("trainloop/preparation.py", "trainloop/steps.py", "trainloop/optimizers.py", *sorted(
    str(p.relative_to(REPO)) for p in (REPO / "trainloop" / "checkpoint").glob("*.py") if p.name != "distcp.py"),
    "callbacks/precision.py", "callbacks/checkpoint.py")
# What a callback may import from the core, besides trainloop's public names and other callbacks.
CALLBACK_SURFACE = ("trainloop.hooks", "trainloop.extension")
MAX_TOP_LEVEL_MODULES = 16  # trainloop/*.py besides __init__, __main__ and _version
MAX_MODULE_LINES = 500


def layer_of(module: str) -> int:
    """The layer of `module`: the one naming it, else the one naming its nearest package."""
    name = module
    while True:
        for index, members in enumerate(LAYERS):
            if name in members:
                return index
        if "." not in name:
            raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layering.py")
        name = name.rsplit(".", 1)[0]
        if name == "trainloop":  # the root package's layer is its own module's, not its children's
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
    # Importing a.b.c runs a.b's __init__ too (the root's excepted: see the module docstring).
    return found | {parent for name in found for parent in _parents(name) if parent in known}


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


def upward_imports(modules: dict[str, str]) -> list[str]:
    """'a imports b' for each import of a module from a higher layer."""
    known = set(modules)
    return [f"{module} (layer {layer_of(module)}) imports {imported} (layer {layer_of(imported)})"
            for module, source in sorted(modules.items())
            for imported in sorted(trainloop_imports(source, known))
            if layer_of(imported) > layer_of(module) and not module.startswith(imported + ".")]


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
    loop = ["trainloop.checkpoint", "trainloop.strategies", "trainloop.strategies.fsdp"]  # through the package's __init__
    rotations = [loop[i:] + loop[:i] for i in range(len(loop))]
    assert any(cycle[:-1] in rotations for cycle in import_cycles(tangled)), import_cycles(tangled)


def test_importing_a_module_counts_as_importing_its_package(sources):
    """The cycle the old state.py hid: a lazy import of one checkpoint module runs the package's
    __init__, which imports the state back."""
    hidden = {**sources, "trainloop.state": "def f():\n    from trainloop.checkpoint.staging import Writer\n"}
    assert "trainloop.state (layer 2) imports trainloop.checkpoint (layer 6)" in upward_imports(hidden)
    assert any("trainloop.state" in cycle and "trainloop.checkpoint" in cycle for cycle in import_cycles(hidden))


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


def callback_reach(module: str, source: str) -> list[str]:
    """What a callback module imports from the core beyond the public API and its surface."""
    reached = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "trainloop":
            names = [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [(alias.name, None) for alias in node.names if alias.name.split(".")[0] == "trainloop"]
        for imported, name in names:
            if imported.startswith("trainloop.callbacks") or imported in CALLBACK_SURFACE:
                continue
            if imported == "trainloop" and name is not None and not name.startswith("_"):
                continue  # the public API
            reached.append(f"{module} imports {name or imported} from {imported}")
    return reached


def test_callbacks_use_only_the_public_api_and_the_extension_surface(sources):
    reached = [line for module, source in sorted(sources.items()) if module.startswith("trainloop.callbacks")
               for line in callback_reach(module, source)]
    assert reached == []


def test_the_callback_check_catches_a_private_reach():
    source = "from trainloop.checkpoint.files import fsync\nfrom trainloop import save, _LAZY\n"
    assert callback_reach("trainloop.callbacks.x", source) == [
        "trainloop.callbacks.x imports fsync from trainloop.checkpoint.files",
        "trainloop.callbacks.x imports _LAZY from trainloop"]


def test_training_code_never_imports_bigmodel(sources):
    known = set(sources)
    reaching = [module for module, source in sorted(sources.items())
                if not module.startswith("trainloop.bigmodel")
                and any(i.startswith("trainloop.bigmodel") for i in trainloop_imports(source, known))]
    assert reaching == []


def test_no_module_is_shadowed_by_a_function_of_its_name():
    """`import trainloop.prepare` must not give a function: every public callable's name is free
    of submodules (so `mock.patch("trainloop.<module>.x")` always reaches a module)."""
    import trainloop

    shadowed = [name for name in trainloop.__all__
                if callable(getattr(trainloop, name)) and importlib.util.find_spec(f"trainloop.{name}") is not None]
    assert shadowed == []


def test_the_tree_stays_small():
    top_level = sorted(p.name for p in (REPO / "trainloop").glob("*.py")
                       if p.name not in ("__init__.py", "__main__.py", "_version.py"))
    assert len(top_level) <= MAX_TOP_LEVEL_MODULES, top_level
    long = {str(file.relative_to(REPO)): lines for file in module_files().values()
            if (lines := len(file.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_callbacks_import_from_a_plain_checkout():
    """`trainloop/callbacks` links to `callbacks/`: no install needed for `trainloop.callbacks`."""
    link = REPO / "trainloop" / "callbacks"
    assert link.is_symlink() and link.resolve() == (REPO / "callbacks").resolve()


# What `import trainloop` may load beyond torch: attrs and trainloop's own modules. Each heavy
# module below costs from 50 ms to over a second (torch._dynamo: 1.2 s on the 2-core machine, once
# imported by the FSDP strategy's module at `import trainloop` time) and is imported by the feature
# that needs it.
HEAVY = ("torch._dynamo", "torch._inductor", "torch.distributed.checkpoint", "torch.distributed.tensor",
         "torch.distributed.fsdp", "torch.distributed.elastic", "torchao", "safetensors", "numpy",
         "tensorboard", "wandb", "mlflow", "transformers", "tqdm", "xxhash")


@pytest.mark.slow  # a fresh interpreter: what is loaded must not be what this process already holds
def test_import_trainloop_loads_nothing_heavy():
    code = ("import json, sys, torch; before = set(sys.modules); import trainloop, trainloop.callbacks; "
            "print(json.dumps(sorted(set(sys.modules) - before)))")
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    loaded = json.loads(done.stdout)
    heavy = [name for name in loaded if any(name == h or name.startswith(h + ".") for h in HEAVY)]
    assert not heavy, f"import trainloop loads {heavy[:5]}: import them where the feature is used"
    third_party = {name.split(".")[0] for name in loaded} - set(sys.stdlib_module_names)
    assert third_party <= {"trainloop", "attr", "attrs"}, sorted(third_party)
