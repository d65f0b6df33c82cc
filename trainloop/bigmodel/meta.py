"""`empty_weights`: build a model on the meta device, in no memory, to be given weights later."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


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
