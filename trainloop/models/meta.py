"""Models built on the meta device: `empty_weights()` to build them, `materialize` to give them storage and values.

`empty_weights` is used by training (`tl.empty_weights()`, then `prepare`) and by big-model
inference (`trainloop.bigmodel`) alike.

A strategy calls `materialize` after it has wrapped or sharded the model, so that under FSDP2 a
rank allocates only its own shards, never the whole model. Every module that holds a meta
parameter or buffer is then initialised by its own `reset_parameters()` (torch's convention),
children before parents (the order in which `__init__` ran them), from a generator seeded with
the run's `seed` on every rank. So the values are the same at any world size, and equal to the
model built whole after `torch.manual_seed(seed)` when its modules initialise in that order.

A sharded (DTensor) parameter is initialised as a whole tensor, one module's parameters at a
time, and each rank keeps its own slice: DTensor's random ops on a CPU mesh would draw each
shard from the same numbers (duplicated rows), and elsewhere need a seed shared by all ranks.
Transient memory: the largest single module's direct parameters, unsharded.

Buffers: `empty_weights()` keeps them real by default (rotary `inv_freq`, position ids and masks
are often computed in `__init__` and not saved, so the meta device would lose them). Built with
`include_buffers=True`, a meta buffer must be recomputed by its module's `reset_parameters()`;
a meta tensor whose module has none is refused, naming it, rather than left as garbage.
"""

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


def has_meta(model: nn.Module) -> bool:
    """True if any parameter or buffer of `model` is on the meta device (no storage yet)."""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def move_real_tensors(model: nn.Module, device: torch.device) -> nn.Module:
    """`model.to(device)` for a model that may hold meta tensors: those stay on meta."""
    if not has_meta(model):
        return model.to(device)
    return model._apply(lambda t: t if t.is_meta else t.to(device))


def materialize(model: nn.Module, device: torch.device, seed: int) -> dict[int, nn.Parameter]:
    """Allocate `model`'s meta tensors on `device` and initialise them (see the module doc).

    In place. Returns id(meta parameter) -> the parameter that replaced it (plain meta
    parameters cannot keep their object; DTensor shards do), to re-bind optimizers built on
    the meta parameters. Raises ValueError, before allocating anything, naming the modules that
    hold meta tensors but have no `reset_parameters()`.
    """
    pending = [module for module in _post_order(model) if any(t.is_meta for t in _own_tensors(module))]
    if not pending:
        return {}
    lacking = [name for name, module in model.named_modules()
               if module in pending and not callable(getattr(module, "reset_parameters", None))]
    if lacking:
        tensors = [f"{name}.{key}" if name else key for name, module in model.named_modules() if name in lacking
                   for key, t in (*module._parameters.items(), *module._buffers.items()) if t is not None and t.is_meta]
        raise ValueError(
            f"{type(model).__name__} was built on the meta device (tl.empty_weights()), but "
            f"{', '.join(tensors[:5])}{' ...' if len(tensors) > 5 else ''} belong to modules without "
            "reset_parameters(), so nothing can initialise them: give those modules a "
            "reset_parameters() (torch's convention), load the weights with tl.load_weights after "
            "prepare, or build the model outside empty_weights()"
        )
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    model._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
    accelerator = {} if device.type == "cpu" else {"devices": [device], "device_type": device.type}
    with torch.random.fork_rng(**({"devices": []} | accelerator)), torch.no_grad():
        torch.manual_seed(seed)  # the same numbers on every rank, whatever the rank's own seed
        for module in pending:
            with _whole_tensors(module):
                module.reset_parameters()  # pyright: ignore[reportCallIssue]  (Module.__getattr__ says Tensor)
    return {key: model.get_parameter(name) for key, name in names.items()}


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]


def _post_order(module: nn.Module, seen: set[int] | None = None) -> Iterator[nn.Module]:
    """Each module once, children before their parent, siblings in registration order."""
    seen = set() if seen is None else seen
    if id(module) in seen:
        return
    seen.add(id(module))
    for child in module.children():
        yield from _post_order(child, seen)
    yield module


@contextlib.contextmanager
def _whole_tensors(module: nn.Module):
    """Swap the module's own sharded (DTensor) tensors for whole ones; keep each rank's slice."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    swapped = []
    for store in (module._parameters, module._buffers):
        for name, tensor in store.items():
            if not isinstance(tensor, DTensor):
                continue
            whole = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.to_local().device)
            if isinstance(tensor, nn.Parameter):
                whole = nn.Parameter(whole, requires_grad=tensor.requires_grad)
            store[name] = whole
            swapped.append((store, name, tensor, whole))
    try:
        yield
    finally:
        for store, name, tensor, whole in swapped:
            store[name] = tensor
            # src_data_rank=None: every rank slices its own copy; no communication.
            mine = distribute_tensor(whole.detach(), tensor.device_mesh, tensor.placements, src_data_rank=None)
            tensor.to_local().copy_(mine.to_local())
