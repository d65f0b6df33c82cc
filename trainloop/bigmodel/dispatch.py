"""`dispatch`: load a checkpoint as a device map places it, offload to disk, stream weights in forward hooks."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from trainloop.bigmodel._devices import _device_name, _is_accelerator, _target_dtype, _to_device
from trainloop.bigmodel._tensors import _find_keys, _first_few, _load, _model_tensors, _ModelTensor
from trainloop.bigmodel.checkpoint_reader import (
    Checkpoint,
    _MappingCheckpoint,
    _open_checkpoint,
    _read_safetensors,
    _SafetensorsCheckpoint,
)
from trainloop.bigmodel.key_map import KeyMap, model_names

_DISPATCH_HOOKS = "_trainloop_dispatch_hooks"  # where `dispatch` keeps its hook handles on the model


def dispatch(model: nn.Module, checkpoint: Checkpoint, device_map: Mapping[str, str | int],
             offload_dir: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
             key_map: KeyMap | None = None) -> nn.Module:
    """Load `checkpoint` into `model` as `device_map` places it; returns the model, in eval mode.

    The checkpoint is read without ever being in RAM as a whole: safetensors files are
    memory-mapped (a `.safetensors` file, a `model.safetensors.index.json` with its shards, or a
    directory holding either); a torch file (.pt, .pth, .bin) is loaded with
    `torch.load(mmap=True, weights_only=True)`; a state dict in memory is also accepted.

    Modules mapped to an accelerator get their weights there; "cpu" modules keep theirs in RAM;
    "disk" modules read theirs from the memory-mapped safetensors file on each forward and drop
    them after (see the package docstring). When the checkpoint is not safetensors, the "disk"
    weights are first written to `offload_dir` as safetensors. Each module's inputs move to the
    device it runs on; the model's output comes back on the first device (the map's first
    accelerator, else the CPU). Tied weights stay one tensor.

    `dtype` casts floating-point weights as they are loaded (default: the dtypes the model's
    tensors have, as `load_state_dict` does). Every parameter must be in the checkpoint; a buffer
    that is not keeps the real value it was built with.

    Checkpoint keys are the model's names unless `key_map` renames them (a callable
    `key -> name`, or a dict of regular expressions to replacements, as `from_pretrained`'s
    `key_mapping`). A Hugging Face model's base-model prefix is added or removed by itself, as
    `from_pretrained` does: a base model's checkpoint (`h.0.attn...`) loads into the model with
    a head (`transformer.h.0.attn...`), and the reverse (`trainloop.bigmodel.key_map`).

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
    _find_keys(tensors, reader, model_names(model, reader.shapes, key_map))
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
