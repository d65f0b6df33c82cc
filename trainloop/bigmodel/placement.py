"""`device_map`: place a model's modules on devices within memory budgets."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from trainloop.bigmodel._devices import _device_name, _target_dtype
from trainloop.models.hf import declared_no_split

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

# `max_memory="auto"` gives weights this share of the free memory: the rest is for activations
# and for the one offloaded block that is streamed in at a time.
_AUTO_SHARE = 0.9


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
    limits: Mapping[Any, int | str]
    if isinstance(max_memory, str) and max_memory == "auto":
        limits = _free_memory()
    elif not isinstance(max_memory, Mapping):
        raise TypeError(f"max_memory must be 'auto' or a dict such as {{'cpu': '8GiB', 'disk': '100GiB'}} "
                        f"(got {max_memory!r})")
    else:
        limits = max_memory
    budgets = {}
    for device, value in limits.items():
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


def _nbytes(tensors: Iterable[torch.Tensor], dtype: torch.dtype | None) -> int:
    return sum(tensor.numel() * _target_dtype(tensor, dtype).itemsize for tensor in tensors)


def device_map(model: nn.Module, max_memory: Mapping[str | int, int | str] | str = "auto",
               no_split: Iterable[type[nn.Module] | str] | None = None,
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
        no_split: module classes (or class names) never split across devices. None (the
            default) takes the model's own list: the `_no_split_modules` class names that
            Hugging Face models declare (their decoder blocks), gathered from every submodule,
            as `from_pretrained(device_map=)` does; none for other models. `()` splits freely.
        dtype: count floating-point weights as if cast to this dtype (as `dispatch(dtype=)` will).

    Sizes count parameters and buffers, a tied weight once. A budget caps the weights that live
    on that device; leave room on the device the model runs on for activations and for one
    offloaded block at a time.

    Raises ValueError when a block needs more bytes than any device has left (naming the block
    and its size), or for an unknown device or an unreadable size; TypeError for a bad
    `max_memory` or `no_split`.
    """
    budgets = _budgets(max_memory)
    keep_whole = _no_split_test(declared_no_split(model) if no_split is None else no_split)
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
