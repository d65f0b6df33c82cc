"""Big-model inference: run a model larger than the accelerator's memory, or than RAM.

    from trainloop.bigmodel import empty_weights, device_map, dispatch

    with empty_weights():                            # parameters on the meta device: no memory
        model = Transformer(config)
    placement = device_map(model, max_memory={"cuda:0": "20GiB", "cpu": "64GiB", "disk": "1TB"},
                           no_split=["DecoderLayer"])
    model = dispatch(model, "checkpoint_dir/", placement)
    logits = model(tokens)                           # offloaded blocks stream in during forward

and `pipeline(state, model, example_args)` for pipeline-parallel inference, one stage per rank.

A device map is a plain `{module name: device}` dict. Each tensor goes where the longest module
name that prefixes its own name says ("" is the whole model): `{"": "cpu", "layers.3": "disk"}`
keeps everything in RAM except `layers.3`. The devices:

- an accelerator ("cuda:0"): the weights live there and the module runs there.
- "cpu": the weights live in RAM. The module runs on the map's first accelerator when it has
  one (its weights are copied there for each forward), else on the CPU.
- "disk": the weights stay in their memory-mapped safetensors file (the checkpoint itself, or a
  copy in `offload_dir` for a checkpoint in another format). Between forwards they are on the
  meta device; each forward of the module reads them in and drops them after.

Outputs equal the fully loaded model's: offloading moves weights, it never changes the maths.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils._pytree import (
    tree_flatten,
    tree_map_only,
    tree_unflatten,
    treespec_dumps,
    treespec_loads,
)

if TYPE_CHECKING:
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle

    from trainloop.state import RunState

__all__ = ["PipelineRunner", "device_map", "dispatch", "empty_weights", "pipeline"]

Checkpoint = str | os.PathLike | Mapping[str, torch.Tensor]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

# `max_memory="auto"` gives weights this share of the free memory: the rest is for activations
# and for the one offloaded block that is streamed in at a time.
_AUTO_SHARE = 0.9

_DISPATCH_HOOKS = "_trainloop_dispatch_hooks"  # where `dispatch` keeps its hook handles on the model


# -- empty_weights ----------------------------------------------------------------------------


@contextlib.contextmanager
def empty_weights(include_buffers: bool = False) -> Iterator[None]:
    """Build modules inside this block with their parameters on the meta device.

    Meta tensors have a shape and a dtype but no storage, so a model of any size is built
    instantly in no memory, and its initialisation (`reset_parameters`) costs nothing.
    `dispatch` or `pipeline(checkpoint=...)` then gives it its real weights.

    Buffers stay real by default: they are often computed in `__init__` (rotary frequencies,
    position ids, masks) and not saved in checkpoints, so the meta device would lose them.
    `include_buffers=True` puts them on meta too; they must then come from the checkpoint.

    Without buffers this patches `nn.Module.register_parameter` for the duration of the block
    (restored on exit, also on an exception), so modules built by other threads meanwhile are
    affected too. With buffers it is torch's own `torch.device("meta")` context.
    """
    if include_buffers:
        with torch.device("meta"):
            yield
        return
    register_parameter = nn.Module.register_parameter

    def register_parameter_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register_parameter(module, name, param)
        # Re-registering a parameter that is already on meta is tying weights
        # (`head.weight = embed.weight`): a new object there would untie them.
        if param is not None and not param.is_meta:
            # A freshly built module's parameter is still untouched memory (torch.empty, its
            # init runs after this): moving it to meta frees it before it costs anything.
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_parameter_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]


# -- devices and budgets ----------------------------------------------------------------------


def _known_devices() -> list[str]:
    accelerator = torch.accelerator.current_accelerator()
    count = torch.accelerator.device_count() if accelerator is not None else 0
    return [*(f"{accelerator.type}:{index}" for index in range(count)), "cpu", "disk"]


def _device_name(device: str | int | torch.device, where: str) -> str:
    """`device` as device maps write it: "cpu", "disk", or an accelerator of this machine ("cuda:0").

    An int is an accelerator index. Raises ValueError for anything else, naming `where` it was.
    """
    if device in ("cpu", "disk"):
        return str(device)
    name = None
    if isinstance(device, int) and not isinstance(device, bool):
        accelerator = torch.accelerator.current_accelerator()
        name = f"{accelerator.type}:{device}" if accelerator is not None else None
    elif isinstance(device, (str, torch.device)):
        with contextlib.suppress(RuntimeError):  # torch's "Expected one of cpu, cuda, ..." for "gpu"
            parsed = torch.device(device)
            name = "cpu" if parsed.type == "cpu" else f"{parsed.type}:{parsed.index or 0}"
    known = _known_devices()
    if name not in known:
        raise ValueError(f"{where} names device {device!r}, which is not a device of this machine: "
                         f"use one of {known}")
    return name


def _is_accelerator(device: str) -> bool:
    return device not in ("cpu", "disk")


def _budget_bytes(value: int | str, device: str) -> int:
    """A budget in bytes, from an int or a string such as "2GiB", "500MB", "1.5 GB"."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*", value)
        if match and match[2].lower() in _UNITS:
            return int(float(match[1]) * _UNITS[match[2].lower()])
    raise ValueError(f"max_memory[{device!r}] = {value!r} is not a size: give bytes (an int) "
                     "or a string such as '2GiB' or '500MB'")


def _budgets(max_memory: Mapping[str | int, int | str] | str) -> list[tuple[str, int]]:
    """The budgets in the order they are filled: accelerators (as given), then "cpu", then "disk"."""
    if isinstance(max_memory, str) and max_memory == "auto":
        max_memory = _free_memory()
    elif not isinstance(max_memory, Mapping):
        raise TypeError(f"max_memory must be 'auto' or a dict such as {{'cpu': '8GiB', 'disk': '100GiB'}} "
                        f"(got {max_memory!r})")
    budgets = {}
    for device, value in max_memory.items():
        name = _device_name(device, "max_memory")
        budgets[name] = _budget_bytes(value, name)
    order = {"cpu": 1, "disk": 2}
    return sorted(budgets.items(), key=lambda item: order.get(item[0], 0))  # stable: accelerators keep theirs


def _free_memory() -> dict[str, int]:
    budgets = {}
    if torch.accelerator.is_available():
        accelerator = torch.accelerator.current_accelerator()
        for index in range(torch.accelerator.device_count()):
            free, _total = torch.accelerator.get_memory_info(index)
            budgets[f"{accelerator.type}:{index}"] = int(free * _AUTO_SHARE)
    budgets["cpu"] = int(_available_ram() * _AUTO_SHARE)
    # Disk offload streams from the safetensors checkpoint in place and needs no room of its
    # own (only a checkpoint in another format is copied to offload_dir).
    budgets["disk"] = sys.maxsize
    return budgets


def _available_ram() -> int:
    """RAM the OS can hand out without swapping: MemAvailable on Linux, the free pages elsewhere."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _target_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype `tensor` is loaded in: `dtype` for floating-point tensors, its own otherwise."""
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def _nbytes(tensors: Iterable[torch.Tensor], dtype: torch.dtype | None) -> int:
    return sum(tensor.numel() * _target_dtype(tensor, dtype).itemsize for tensor in tensors)


# -- device_map -------------------------------------------------------------------------------


def device_map(model: nn.Module, max_memory: Mapping[str | int, int | str] | str = "auto",
               no_split: Iterable[type[nn.Module] | str] = (),
               dtype: torch.dtype | None = None) -> dict[str, str]:
    """Place the model's modules on devices within memory budgets; returns `{module name: device}`.

    Modules are taken in model order and placed whole on the first device with room left:
    the accelerators (in the order given), then "cpu", then "disk". A module that does not fit
    is split into its children, unless its class is in `no_split` (classes or class names:
    the blocks whose forward must see all their weights, e.g. a decoder layer with residuals).
    The result is a plain dict to print, edit and pass to `dispatch`.

    Args:
        model: usually built under `empty_weights()`; only shapes and dtypes are read.
        max_memory: bytes per device, as ints or strings ("2GiB", "500MB"), keyed by "cpu",
            "disk", an accelerator ("cuda:0") or an accelerator index (0). Devices left out are
            not used. "auto" (the default) takes 90% of what each accelerator and the RAM have
            free now, and an unbounded "disk".
        no_split: module classes (or class names) never split across devices.
        dtype: count floating-point weights as if cast to this dtype (as `dispatch(dtype=)` will).

    Sizes count parameters and buffers, a tied weight once. A budget caps the weights that live
    on that device; leave room on the device the model runs on for activations and for one
    offloaded block at a time.

    Raises ValueError when a block needs more bytes than any device has left (naming the block
    and its size), or for an unknown device or an unreadable size; TypeError for a bad
    `max_memory` or `no_split`.
    """
    budgets = _budgets(max_memory)
    keep_whole = _no_split_test(no_split)
    placement: dict[str, str] = {}
    counted: set[int] = set()  # ids of the tensors already placed: a tied weight is counted once
    device_index, used = 0, 0
    pending = [("", model)]  # a stack: children are pushed reversed so that they pop in model order
    while pending:
        name, module = pending.pop()
        if not _tensors_under(module, recurse=True):
            continue  # nothing to place (activations, dropout); a tied-only module is still placed
        tensors = _uncounted(_tensors_under(module, recurse=True), counted)
        own = _uncounted(_tensors_under(module, recurse=False), counted)
        size, own_size = _nbytes(tensors, dtype), _nbytes(own, dtype)
        splittable = bool(next(module.children(), None)) and not keep_whole(module)
        while True:
            if device_index == len(budgets):
                raise _too_small(name, module, own_size if splittable else size, splittable, budgets)
            device, budget = budgets[device_index]
            if used + size <= budget:
                placement[name] = device
                used += size
                counted.update(map(id, tensors))
                break
            if splittable and used + own_size <= budget:
                if own:  # the module's own tensors stay with it; its children are placed one by one
                    placement[name] = device
                    used += own_size
                    counted.update(map(id, own))
                children = [(f"{name}.{child_name}" if name else child_name, child)
                            for child_name, child in module.named_children()]
                pending.extend(reversed(children))
                break
            device_index, used = device_index + 1, 0
    return placement


def _tensors_under(module: nn.Module, recurse: bool) -> list[torch.Tensor]:
    return [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]


def _uncounted(tensors: list[torch.Tensor], counted: set[int]) -> list[torch.Tensor]:
    return [tensor for tensor in tensors if id(tensor) not in counted]


def _no_split_test(no_split: Iterable[type[nn.Module] | str]) -> Callable[[nn.Module], bool]:
    classes, names = [], set()
    for item in no_split:
        if isinstance(item, str):
            names.add(item)
        elif isinstance(item, type):
            classes.append(item)
        else:
            raise TypeError(f"no_split takes module classes or class names (got {item!r})")
    classes_tuple = tuple(classes)
    return lambda module: isinstance(module, classes_tuple) or type(module).__name__ in names


def _too_small(name: str, module: nn.Module, needed: int, splittable: bool,
               budgets: list[tuple[str, int]]) -> ValueError:
    label = f"module {name!r}" if name else "the model"
    if splittable:
        why = "its own parameters and buffers, which stay together"
    elif next(module.children(), None) is not None:
        why = "kept whole by no_split"
    else:
        why = "one module, with no submodules to split it into"
    largest_device, largest = max(budgets, key=lambda item: item[1], default=("none", 0))
    return ValueError(
        f"max_memory is too small: {label} ({type(module).__name__}) needs {needed:,} bytes on one "
        f"device ({why}), and no device had that much room left (the largest budget is {largest:,} "
        f"bytes, on {largest_device!r}). Raise max_memory, or add a 'disk' budget."
    )


# -- checkpoints ------------------------------------------------------------------------------


class _SafetensorsCheckpoint:
    """Safetensors files (one, or the shards of an index), memory-mapped a few tensors at a time."""

    streams_from_disk = True  # its files can serve as the store of the "disk" modules

    def __init__(self, files: Iterable[Path]) -> None:
        self.file_of: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in files:  # headers only: safe_open reads no tensor data until asked
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                    self.file_of[key] = file
                    self.shapes[key] = tuple(handle.get_slice(key).get_shape())

    def read(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """`(key, tensor)` for each key: tensors are views into the file's memory map, not copies.

        Each file is opened once per call and closed when its keys are read: the pages a mapping
        touched count in this process's memory until it is closed and its views are dropped, so a
        handle kept open across a whole checkpoint would hold all of it.
        """
        keys = list(keys)
        for index, tensor in _read_safetensors([(self.file_of[key], key) for key in keys]):
            yield keys[index], tensor


class _MappingCheckpoint:
    """A state dict in memory, or a torch file loaded with mmap=True (its pages read on demand)."""

    streams_from_disk = False

    def __init__(self, tensors: Mapping[str, Any]) -> None:
        for key, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"checkpoint[{key!r}] is a {type(value).__name__}, not a tensor: "
                                "pass a flat state dict (name -> tensor)")
        self.tensors = tensors
        self.shapes = {key: tuple(value.shape) for key, value in tensors.items()}

    def read(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for key in keys:
            yield key, self.tensors[key]


def _read_safetensors(sources: Sequence[tuple[Path, str]]) -> Iterator[tuple[int, torch.Tensor]]:
    """`(i, tensor)` for the `(file, key)` at `sources[i]`, opening each file once."""
    by_file: dict[Path, list[int]] = {}
    for index, (file, _key) in enumerate(sources):
        by_file.setdefault(file, []).append(index)
    for file, indices in by_file.items():
        with safe_open(file, framework="pt") as handle:
            for index in indices:
                yield index, handle.get_tensor(sources[index][1])


def _open_checkpoint(checkpoint: Checkpoint) -> _SafetensorsCheckpoint | _MappingCheckpoint:
    """Read a checkpoint's index: which keys it has, their shapes and where each one is."""
    if isinstance(checkpoint, Mapping):
        return _MappingCheckpoint(checkpoint)
    path = Path(checkpoint)
    if path.is_dir():
        path = _checkpoint_in(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.name.endswith(".safetensors"):
        return _SafetensorsCheckpoint([path])
    if path.name.endswith(".json"):
        weight_map = json.loads(path.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{str(path)!r} has no 'weight_map': expected a safetensors index "
                             "such as model.safetensors.index.json")
        shards = [path.parent / name for name in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise FileNotFoundError(f"shard {str(shard)!r} listed in {str(path)!r} does not exist")
        return _SafetensorsCheckpoint(shards)
    if path.suffix in (".pt", ".pth", ".bin"):
        # weights_only: loading a checkpoint never runs code from it. mmap: tensors are paged in
        # when read, so the file is never in RAM as a whole.
        return _MappingCheckpoint(torch.load(path, map_location="cpu", mmap=True, weights_only=True))
    raise ValueError(f"checkpoint {str(path)!r}: expected a .safetensors file, a safetensors index "
                     "(.json), a directory holding one, or a torch file (.pt, .pth, .bin)")


def _checkpoint_in(directory: Path) -> Path:
    for name in ("model.safetensors.index.json", "model.safetensors"):
        if (directory / name).is_file():
            return directory / name
    found = sorted(directory.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    raise FileNotFoundError(f"no checkpoint in {str(directory)!r}: expected model.safetensors.index.json, "
                            f"model.safetensors or a single *.safetensors file (found {len(found)})")


# -- the model's tensors ----------------------------------------------------------------------


@dataclass(eq=False)
class _ModelTensor:
    """One tensor of a model under every name it has: tied weights are one _ModelTensor."""

    names: list[str]
    places: list[tuple[dict, str]]  # the modules' `_parameters`/`_buffers` dicts holding it, and keys
    is_parameter: bool
    requires_grad: bool
    initial: torch.Tensor | None = None  # a buffer's real value, kept if the checkpoint lacks it
    key: str | None = None  # its key in the checkpoint
    home: str = "cpu"  # where it lives between forwards: an accelerator, "cpu" or "disk"
    disk: tuple[Path, str] | None = None  # (safetensors file, key) of a "disk" tensor
    aliases: list[str] = field(default_factory=list)  # other names it may have in the checkpoint

    @property
    def value(self) -> torch.Tensor:
        store, attr = self.places[0]
        return store[attr]

    def set(self, value: torch.Tensor) -> None:
        """Make every place hold `value` (the same object: tied names stay tied)."""
        for store, attr in self.places:
            store[attr] = value

    def put(self, data: torch.Tensor) -> None:
        """Make every place hold `data`, as a Parameter where the model has a parameter."""
        self.set(nn.Parameter(data, requires_grad=self.requires_grad) if self.is_parameter else data)


def _model_tensors(model: nn.Module) -> list[_ModelTensor]:
    found: dict[int, _ModelTensor] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for store, is_parameter in ((module._parameters, True), (module._buffers, False)):
            for attr, tensor in store.items():
                if tensor is None:
                    continue
                entry = found.get(id(tensor))
                if entry is None:
                    # Only buffers keep their initial value: holding a real parameter here
                    # would keep the model's old weights alive as long as the hooks.
                    initial = None if is_parameter or tensor.is_meta else tensor
                    entry = found[id(tensor)] = _ModelTensor(names=[], places=[], is_parameter=is_parameter,
                                                             requires_grad=tensor.requires_grad, initial=initial)
                entry.names.append(f"{module_name}.{attr}" if module_name else attr)
                entry.places.append((store, attr))
    return list(found.values())


def _find_keys(tensors: list[_ModelTensor], checkpoint: _SafetensorsCheckpoint | _MappingCheckpoint) -> None:
    """Find each tensor's checkpoint key, under any of its names; check that every one is there.

    A parameter must be in the checkpoint. A buffer that is not keeps the real value it was built
    with (non-persistent buffers are never saved); a buffer on the meta device has none.
    """
    missing, missing_buffers, mismatched = [], False, []
    for tensor in tensors:
        tensor.key = next((name for name in (*tensor.names, *tensor.aliases) if name in checkpoint.shapes), None)
        if tensor.key is None:
            if tensor.is_parameter or tensor.initial is None:
                missing.append(tensor.names[0])
                missing_buffers |= not tensor.is_parameter
        elif checkpoint.shapes[tensor.key] != tuple(tensor.value.shape):
            mismatched.append(f"{tensor.key} {list(checkpoint.shapes[tensor.key])} vs {list(tensor.value.shape)}")
    if missing:
        buffer_hint = (" Buffers that checkpoints do not save must be built real: "
                       "use empty_weights(include_buffers=False).") if missing_buffers else ""
        raise ValueError(
            f"the checkpoint is missing {len(missing)} of the model's tensors: {_first_few(missing)}. "
            f"Is it this model's checkpoint (same names, no extra prefix such as 'model.')?{buffer_hint}")
    if mismatched:
        raise ValueError(f"checkpoint shapes differ from the model's (checkpoint vs model): {_first_few(mismatched)}")


def _first_few(items: list[str], count: int = 5) -> str:
    more = f" and {len(items) - count} more" if len(items) > count else ""
    return ", ".join(items[:count]) + more


def _load(tensors: list[_ModelTensor], checkpoint: _SafetensorsCheckpoint | _MappingCheckpoint,
          device: str | torch.device, dtype: torch.dtype | None) -> None:
    """Give each tensor its real value on `device`: from the checkpoint, else its initial value."""
    by_key: dict[str, list[_ModelTensor]] = {}
    for tensor in tensors:
        if tensor.key is not None:
            by_key.setdefault(tensor.key, []).append(tensor)
        else:
            tensor.put(tensor.initial.to(device))
    for key, data in checkpoint.read(list(by_key)):
        for tensor in by_key[key]:
            # copy=True even when device and dtype match: a view would keep the whole file mapped.
            tensor.put(data.to(device=device, dtype=_target_dtype(tensor.value, dtype), copy=True))


def _to_device(tree: Any, device: str | torch.device) -> Any:
    return tree_map_only(torch.Tensor, lambda tensor: tensor.to(device), tree)


# -- dispatch ---------------------------------------------------------------------------------


def dispatch(model: nn.Module, checkpoint: Checkpoint, device_map: Mapping[str, str | int],
             offload_dir: str | os.PathLike | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Load `checkpoint` into `model` as `device_map` places it; returns the model, in eval mode.

    The checkpoint is read without ever being in RAM as a whole: safetensors files are
    memory-mapped (a `.safetensors` file, a `model.safetensors.index.json` with its shards, or a
    directory holding either); a torch file (.pt, .pth, .bin) is loaded with
    `torch.load(mmap=True, weights_only=True)`; a state dict in memory is also accepted.

    Modules mapped to an accelerator get their weights there; "cpu" modules keep theirs in RAM;
    "disk" modules read theirs from the memory-mapped safetensors file on each forward and drop
    them after (see the module docstring). When the checkpoint is not safetensors, the "disk"
    weights are first written to `offload_dir` as safetensors. Each module's inputs move to the
    device it runs on; the model's output comes back on the first device (the map's first
    accelerator, else the CPU). Tied weights stay one tensor.

    `dtype` casts floating-point weights as they are loaded (default: the dtypes the model's
    tensors have, as `load_state_dict` does). Every parameter must be in the checkpoint; a buffer
    that is not keeps the real value it was built with.

    The work happens in forward hooks on the mapped modules (never a patched class or
    `forward`); calling `dispatch` again replaces them. An entry for a container that is never
    called itself (ModuleList, ModuleDict) places each of its children. Hooks fire when a module
    is called: code that reads a module's weights directly, or calls its `.forward()`, must keep
    it in the same entry as the caller.

    Raises ValueError for a map that names an unknown module or device, or leaves a module
    unplaced; for missing keys or shape mismatches; for an offload_dir that is missing or not
    writable when needed. FileNotFoundError for a checkpoint that does not exist.
    """
    placement = _checked_map(model, device_map)
    tensors = _model_tensors(model)
    _assign_homes(tensors, placement)
    reader = _open_checkpoint(checkpoint)
    _find_keys(tensors, reader)
    offload_to = None
    if not reader.streams_from_disk and any(t.home == "disk" for t in tensors):
        if offload_dir is None:
            raise ValueError("device_map sends modules to 'disk' and the checkpoint is not safetensors, so "
                             "their weights must be written out as safetensors first: pass offload_dir=")
        offload_to = _writable_dir(offload_dir)

    for handle in getattr(model, _DISPATCH_HOOKS, ()):
        handle.remove()
    owned: dict[str, list[_ModelTensor]] = {group: [] for group in placement}
    for tensor in tensors:
        owned[_group_of(tensor.names[0], placement)].append(tensor)
    for group, home in placement.items():  # a group at a time: memory grows by one group's reads
        if home == "disk":
            _offload(owned[group], reader, group, offload_to, dtype)
        else:
            _load(owned[group], reader, home, dtype)

    main_device = next((device for device in placement.values() if _is_accelerator(device)), "cpu")
    setattr(model, _DISPATCH_HOOKS, _register_hooks(model, tensors, placement, main_device))
    return model.eval()


def _checked_map(model: nn.Module, device_map: Mapping[str, str | int]) -> dict[str, str]:
    if not isinstance(device_map, Mapping):
        raise TypeError(f"device_map must be a dict of module name -> device (got {type(device_map).__name__})")
    placement = {}
    for name, device in device_map.items():
        try:
            model.get_submodule(name)
        except AttributeError as error:
            raise ValueError(f"device_map names {name!r}, which is not a module of this "
                             f"{type(model).__name__}: use names from model.named_modules()") from error
        placement[name] = _device_name(device, f"device_map[{name!r}]")
    for name, device in list(placement.items()):
        _place_children_of_containers(model.get_submodule(name), name, device, placement)
    return placement


def _place_children_of_containers(module: nn.Module, name: str, device: str, placement: dict[str, str]) -> None:
    """Give the children of a container that is never called (ModuleList, ModuleDict) their
    container's device: hooks fire only on modules that run a forward of their own."""
    if not name or _runs_forward(module):
        return
    for child_name, child in module.named_children():
        child_path = f"{name}.{child_name}"
        if child_path not in placement:  # an entry of the user's own wins
            placement[child_path] = device
            _place_children_of_containers(child, child_path, device, placement)


def _runs_forward(module: nn.Module) -> bool:
    return type(module).forward is not nn.Module.forward


def _group_of(tensor_name: str, placement: Mapping[str, str]) -> str | None:
    """The device map entry that places a tensor: the longest module name prefixing its name."""
    parts = tensor_name.split(".")
    for length in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:length])
        if prefix in placement:
            return prefix
    return None


def _assign_homes(tensors: list[_ModelTensor], placement: Mapping[str, str]) -> None:
    unplaced = sorted({name.rpartition(".")[0] or "(the model itself)"
                       for tensor in tensors for name in tensor.names if _group_of(name, placement) is None})
    if unplaced:
        raise ValueError(f"device_map leaves {len(unplaced)} module(s) unplaced: {_first_few(unplaced)}. "
                         "Add an entry for each, or for a module holding them ('' is the whole model).")
    for tensor in tensors:
        # A tied tensor lives where its first name is placed; other modules using it fetch it.
        tensor.home = placement[_group_of(tensor.names[0], placement)]


def _writable_dir(path: str | os.PathLike) -> Path:
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise ValueError(f"offload_dir {str(directory)!r} is not writable ({error.strerror or error}): "
                         "pass a directory you can create files in") from error
    return directory


def _offload(tensors: list[_ModelTensor], reader: _SafetensorsCheckpoint | _MappingCheckpoint, group: str,
             offload_to: Path | None, dtype: torch.dtype | None) -> None:
    """Leave `tensors` on disk: meta placeholders in the model, their data in a safetensors file."""
    in_checkpoint = [t for t in tensors if t.key is not None]
    if offload_to is None:  # the checkpoint's own files are the store
        for tensor in in_checkpoint:
            tensor.disk = (reader.file_of[tensor.key], tensor.key)
    elif in_checkpoint:
        file = offload_to / f"{group or 'model'}.safetensors"
        # clone: tensors of a torch checkpoint may share storage, which safetensors refuses.
        save_file({key: data.clone(memory_format=torch.contiguous_format)
                   for key, data in reader.read({t.key for t in in_checkpoint})}, file)
        for tensor in in_checkpoint:
            tensor.disk = (file, tensor.key)
    for tensor in tensors:
        if tensor.key is None:
            tensor.home = "cpu"  # a buffer that is not in the checkpoint has no file to stream from
            tensor.put(tensor.initial.to("cpu"))
        else:
            placeholder = torch.empty(tensor.value.shape, dtype=_target_dtype(tensor.value, dtype), device="meta")
            tensor.put(placeholder)


class _Streamer:
    """Forward hooks that run one module on `device` with all the weights it uses there.

    Before the forward: the inputs move to `device`, and each of `tensors` that is not already
    there is brought in, copied from RAM or another device, or read from its memory-mapped file.
    After it (also when it raised), every tensor gets back the exact object it held before: RAM
    copies go back to RAM, disk weights back to their meta placeholders, and the memory the
    forward borrowed is released.
    """

    def __init__(self, tensors: list[_ModelTensor], device: str) -> None:
        self.tensors = tensors
        self.device = torch.device(device)
        self._borrowed: list[list[tuple[_ModelTensor, torch.Tensor]]] = []  # a stack: modules may re-enter

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        borrowed = [(tensor, tensor.value) for tensor in self.tensors if tensor.value.device != self.device]
        # Pushed first: if a read below fails, `after` (always called) still puts back exactly these.
        self._borrowed.append(borrowed)
        for tensor, held in borrowed:
            if not held.is_meta:
                tensor.put(held.to(self.device))
        from_disk = [(tensor, held) for tensor, held in borrowed if held.is_meta]
        for index, data in _read_safetensors([tensor.disk for tensor, _held in from_disk]):
            tensor, placeholder = from_disk[index]
            # On the CPU in the file's dtype this is the memory-mapped view itself: no copy.
            tensor.put(data.to(self.device, placeholder.dtype))
        return _to_device((args, kwargs), self.device)

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        for tensor, held in self._borrowed.pop():
            tensor.set(held)


def _register_hooks(model: nn.Module, tensors: list[_ModelTensor], placement: Mapping[str, str],
                    main_device: str) -> list[torch.utils.hooks.RemovableHandle]:
    runs_on = {group: home if _is_accelerator(home) else main_device for group, home in placement.items()}
    several_devices = len(set(runs_on.values())) > 1
    used: dict[str, list[_ModelTensor]] = {group: [] for group in placement}
    for tensor in tensors:  # a tied tensor is used by the group of each of its names
        for group in {_group_of(name, placement) for name in tensor.names}:
            used[group].append(tensor)
    handles = [
        model.register_forward_pre_hook(lambda module, args, kwargs: _to_device((args, kwargs), main_device),
                                        with_kwargs=True),
        model.register_forward_hook(lambda module, args, kwargs, output: _to_device(output, main_device),
                                    with_kwargs=True),
    ]
    for group, device in runs_on.items():
        module = model.get_submodule(group)
        streamer = _Streamer([t for t in used[group] if t.home != device], device)
        if (streamer.tensors or several_devices) and _runs_forward(module):
            handles.append(module.register_forward_pre_hook(streamer.before, with_kwargs=True))
            handles.append(module.register_forward_hook(streamer.after, with_kwargs=True, always_call=True))
    return handles


# -- pipeline ---------------------------------------------------------------------------------


def pipeline(state: RunState, model: nn.Module, example_args: Sequence[Any], *,
             split_points: Sequence[str] | None = None, n_microbatches: int | None = None,
             checkpoint: Checkpoint | None = None, broadcast: bool = False) -> PipelineRunner:
    """Split `model` into one stage per rank and return this rank's runner, for inference.

    Built on `torch.distributed.pipelining`: the model is traced with `torch.export` on a
    micro-batch of `example_args` (the whole batch, split into `n_microbatches`), cut before each
    of `split_points` (module names, each one torch's `SplitPoint.BEGINNING`), and run with the
    GPipe schedule. By default the cuts are evenly spaced among the blocks of the model's largest
    `nn.ModuleList`. Every rank calls `pipeline` with the same arguments.

    With `checkpoint`, the model is traced on the meta device and each rank loads only its own
    stage's weights from the checkpoint (in the dtypes the model's tensors have): build the model
    under `empty_weights()` and no rank ever holds the whole model. Without it, the model must
    have real weights, and each rank keeps its stage (moved to `state.device`).

    The runner takes batches shaped like `example_args` (export fixes the shapes). Its output is
    on the last rank, or on every rank with `broadcast=True`; other ranks get None.

    Raises ValueError for split points that are not modules or not `world_size - 1` of them, a
    batch that `n_microbatches` does not divide, or a meta model without `checkpoint`.
    """
    from torch.distributed.pipelining import ScheduleGPipe, SplitPoint
    from torch.distributed.pipelining import pipeline as trace_pipeline

    n_microbatches = state.world_size if n_microbatches is None else n_microbatches
    example_args = tuple(example_args)
    cuts = _split_points(model, split_points, state.world_size)
    microbatch = _first_microbatch(example_args, n_microbatches)
    tensors = _model_tensors(model.eval())
    if checkpoint is None and any(t.value.is_meta for t in tensors):
        raise ValueError("the model has weights on the meta device (built under empty_weights()?): pass "
                         "checkpoint= so that each rank loads its own stage's weights")
    on_meta = contextlib.nullcontext() if checkpoint is None else _all_on_meta(tensors)
    with on_meta, _restoring_forwards(model, cuts):
        pipe = trace_pipeline(model, _to_device(microbatch, "meta") if checkpoint is not None else microbatch,
                              split_spec={name: SplitPoint.BEGINNING for name in cuts})
    if checkpoint is not None:
        _load_stage(pipe.get_stage_module(state.rank), tensors, _open_checkpoint(checkpoint), state.device)
    schedule = ScheduleGPipe(pipe.build_stage(state.rank, state.device), n_microbatches=n_microbatches)
    return PipelineRunner(state, schedule, example_args, broadcast)


class PipelineRunner:
    """One rank's stage of a pipelined model. Call it on every rank with whole batches.

    The first rank's inputs are the ones used (other ranks may pass the same or nothing: pass
    them, and a wrongly shaped batch is refused on every rank instead of hanging the others).
    Returns the model's output on the last rank (on every rank when built with `broadcast=True`),
    None elsewhere.
    """

    def __init__(self, state: RunState, schedule: PipelineScheduleSingle, example_args: tuple,
                 broadcast: bool) -> None:
        self._schedule = schedule
        self._device = state.device
        self._rank, self._last = state.rank, state.world_size - 1
        self._broadcast = broadcast
        self._signature = _signature(example_args)

    def __call__(self, *args: Any) -> Any:
        if args and _signature(args) != self._signature:
            raise ValueError(f"this pipeline was traced for inputs {self._signature}, got {_signature(args)}: "
                             "torch.export fixes the shapes, so build a pipeline for each input shape")
        with torch.no_grad():
            if self._rank == 0:
                if not args:
                    raise ValueError("rank 0 runs the first stage: it must pass the inputs")
                output = self._schedule.step(*_to_device(args, self._device))
            else:
                output = self._schedule.step()
        if self._broadcast:
            return _broadcast_tree(output, self._last, self._rank, self._device)
        return output if self._rank == self._last else None


def _split_points(model: nn.Module, split_points: Sequence[str] | None, world_size: int) -> list[str]:
    if split_points is None:
        return _even_split_points(model, world_size)
    cuts = list(split_points)
    if len(cuts) != world_size - 1:
        raise ValueError(f"pipeline runs one stage per rank: {world_size} ranks need {world_size - 1} "
                         f"split point(s), got {len(cuts)} ({cuts})")
    for name in cuts:
        try:
            model.get_submodule(name)
        except AttributeError as error:
            raise ValueError(f"split point {name!r} is not a module of this {type(model).__name__}: "
                             "use names from model.named_modules()") from error
        if not name:
            raise ValueError("split point '' is the whole model: name the module each stage starts at")
    return cuts


def _even_split_points(model: nn.Module, world_size: int) -> list[str]:
    """Cuts evenly spaced among the blocks of the largest ModuleList (by parameter count)."""
    lists = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) and name]
    if not lists:
        raise ValueError("pipeline found no nn.ModuleList of blocks to split evenly: pass split_points=")
    name, blocks = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    if len(blocks) < world_size:
        raise ValueError(f"{name!r} has {len(blocks)} blocks, fewer than the {world_size} stages needed: "
                         "pass split_points=")
    return [f"{name}.{stage * len(blocks) // world_size}" for stage in range(1, world_size)]


def _first_microbatch(example_args: tuple, n_microbatches: int) -> tuple:
    leaves = [leaf for leaf in tree_flatten(example_args)[0] if isinstance(leaf, torch.Tensor)]
    sizes = {leaf.shape[0] for leaf in leaves if leaf.dim()}
    if len(sizes) != 1:
        raise ValueError(f"example_args need tensors with one batch size along dim 0 (got sizes {sorted(sizes)})")
    batch = sizes.pop()
    if n_microbatches < 1 or batch % n_microbatches:
        raise ValueError(f"the batch of {batch} does not split into n_microbatches={n_microbatches} equal "
                         "micro-batches: pick a divisor of the batch size")
    return tree_map_only(torch.Tensor, lambda tensor: tensor[: batch // n_microbatches], example_args)


def _signature(args: tuple) -> str:
    leaves, spec = tree_flatten(args)
    return ", ".join(f"{leaf.dtype}{list(leaf.shape)}" if isinstance(leaf, torch.Tensor) else repr(leaf)
                     for leaf in leaves) + f" ({spec.num_leaves} leaves)"


@contextlib.contextmanager
def _all_on_meta(tensors: list[_ModelTensor]) -> Iterator[None]:
    """Swap every real tensor of the model for a meta one while tracing, then put them back.

    torch.export cannot trace a model whose tensors mix meta and real devices (real buffers of an
    `empty_weights()` model); on meta, tracing also costs no memory.
    """
    real = [(tensor, tensor.value) for tensor in tensors if not tensor.value.is_meta]
    for tensor, value in real:
        tensor.put(value.to("meta"))
    try:
        yield
    finally:
        for tensor, value in real:
            tensor.set(value)


@contextlib.contextmanager
def _restoring_forwards(model: nn.Module, cuts: list[str]) -> Iterator[None]:
    """torch marks split points by setting `forward` on those module instances: undo it after tracing."""
    modules = [model.get_submodule(name) for name in cuts]
    try:
        yield
    finally:
        for module in modules:
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_orig_forward", None)


def _load_stage(stage: nn.Module, model_tensors: list[_ModelTensor],
                reader: _SafetensorsCheckpoint | _MappingCheckpoint, device: torch.device) -> None:
    """Load a traced stage's tensors (all meta, named as in the model) from the checkpoint."""
    origin = {name: tensor for tensor in model_tensors for name in tensor.names}
    tensors = _model_tensors(stage)
    for tensor in tensors:
        source = origin.get(tensor.names[0])
        if source is not None:
            tensor.aliases = source.names  # a tied weight may be saved under its other name
            tensor.initial = source.initial  # the real value a buffer was built with
    _find_keys(tensors, reader)
    _load(tensors, reader, device, dtype=None)


def _broadcast_tree(tree: Any, src: int, rank: int, device: torch.device) -> Any:
    """Rank `src`'s pytree of tensors on every rank: a JSON header (structure, dtypes, shapes),
    then the tensors. JSON, not `broadcast_object_list`, because that one unpickles."""
    if rank == src:
        leaves, spec = tree_flatten(tree)
        if all(isinstance(leaf, torch.Tensor) for leaf in leaves):
            header = {"spec": treespec_dumps(spec),
                      "leaves": [[str(leaf.dtype).removeprefix("torch."), list(leaf.shape)] for leaf in leaves]}
        else:  # tell the other ranks, who are waiting for the header, instead of leaving them hanging
            header = {"error": "broadcast=True needs a model output made of tensors (got "
                               f"{sorted({type(leaf).__name__ for leaf in leaves})})"}
        encoded = torch.frombuffer(bytearray(json.dumps(header).encode()), dtype=torch.uint8).to(device)
        length = torch.tensor([encoded.numel()], device=device)
    else:
        length = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(length, src)
    if rank != src:
        encoded = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    dist.broadcast(encoded, src)
    header = json.loads(bytes(encoded.cpu().tolist()))
    if "error" in header:
        raise TypeError(header["error"])
    received = []
    for index, (dtype_name, shape) in enumerate(header["leaves"]):
        if rank == src:
            tensor = leaves[index].to(device).contiguous()
        else:
            tensor = torch.empty(shape, dtype=getattr(torch, dtype_name), device=device)
        dist.broadcast(tensor, src)
        received.append(tensor)
    return tree_unflatten(received, treespec_loads(header["spec"]))
