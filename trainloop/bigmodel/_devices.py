"""Helpers shared by placement, dispatch and pipeline: device names, load dtypes, moving pytrees."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.utils._pytree import tree_map_only


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


def _target_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype `tensor` is loaded in: `dtype` for floating-point tensors, its own otherwise."""
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def _to_device(tree: Any, device: str | torch.device) -> Any:
    return tree_map_only(torch.Tensor, lambda tensor: tensor.to(device), tree)
