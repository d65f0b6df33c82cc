"""FSDP2 for `init(strategy="fsdp")`: shard models, bind optimizers, gather for export.

`FullyShard.wrap` calls `shard` for each model: rank 0's parameters and buffers are broadcast,
then `torch.distributed.fsdp.fully_shard` wraps each block (innermost first) and finally the root.
Blocks are the modules whose class names `init(fsdp_blocks="Block,Head")` gives, or by default
the children of the model's largest `nn.ModuleList` (a transformer's layers); a model with
neither is sharded at the root only, with a warning. Each block's parameters are gathered for
its forward and backward and freed after, so a rank holds one block unsharded at a time.

Sharding replaces every parameter by a new `DTensor` parameter. An optimizer built before
`prepare` still points at the old ones; `bind_optimizer` swaps its param groups over to the
shards in place, so the optimizer object (and any scheduler stepping it) stays the same.

Checkpoints are sharded (`sharded = True`): every rank writes its shards through
torch.distributed.checkpoint (`trainloop.distcp`), and a later run at any world size reads the
pieces it needs.

This module imports torch.distributed.fsdp (about 0.5 s): `trainloop.strategies.create` imports
it only for FSDP runs.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from trainloop.precision import AUTOCAST_DTYPES
from trainloop.strategies.base import rebind
from trainloop.strategies.blocks import find_blocks
from trainloop.strategies.meta_init import materialize
from trainloop.topology import leave_process_group
from trainloop.wrappers import unwrap

if TYPE_CHECKING:
    from trainloop.config import Config
    from trainloop.state import RunState


class FullyShard:
    """The strategy of `strategy="fsdp"`, on any number of processes (one included)."""

    name = "fsdp"
    sharded = True

    def __init__(self, config: Config, rank: int, world_size: int):
        self.config = config
        self._rank, self._world_size = rank, world_size

    def wrap(self, state: RunState, model: nn.Module) -> tuple[nn.Module, dict[int, nn.Parameter]]:
        # In place, also on one process; under compile, the user's module inside the wrapper.
        return model, shard(state, unwrap(model))

    def bind_optimizer(self, optimizer: torch.optim.Optimizer, replaced: dict[int, nn.Parameter]) -> None:
        bind_optimizer(optimizer, replaced)

    def no_sync(self, models: Sequence[nn.Module]) -> contextlib.AbstractContextManager:
        return _no_gradient_sync([unwrap(model) for model in models])

    def data_parallel(self) -> tuple[int, int]:
        return self._rank, self._world_size

    def grad_norm(self, grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
        total = torch.nn.utils.get_total_norm(grads, norm_type)
        # Each rank's norm of its shards is a partial DTensor: full_tensor reduces it over ranks.
        return total.full_tensor() if isinstance(total, DTensor) else total

    def export_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return full_state_dict(unwrap(model))

    def __repr__(self) -> str:
        return "FullyShard()"


@contextlib.contextmanager
def _no_gradient_sync(modules: list[nn.Module]):
    sharded = [module for module in modules if isinstance(module, FSDPModule)]
    for module in sharded:
        module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for module in sharded:
            module.set_requires_gradient_sync(True)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole, unsharded state dict on rank 0's CPU (empty on the other ranks).

    A collective: call on every rank. Gathers one tensor at a time, so rank 0 needs CPU memory
    for the model, and each device only for one parameter.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


# -- sharding ----------------------------------------------------------------------------------


def shard(state: RunState, model: nn.Module) -> dict[int, nn.Parameter]:
    """Apply FSDP2 to `model` (already on `state.device`), in place: each block, then the root.

    Returns id(parameter before sharding) -> the shard that replaced it, for `bind_optimizer`.

    Afterwards its parameters are `DTensor` shards over all ranks. Parameters and
    buffers are rank 0's on every rank; a model built on the meta device gets storage for its
    shards only, initialised by each module's `reset_parameters()` (`meta_init.materialize`). Mixed precision follows `state.config.precision`: under
    bf16 (and fp8) and fp16 the gathered parameters and the compute are in that dtype while the
    sharded parameters, the optimizer and the gradient reduction stay fp32. On one process a
    single-rank process group is joined, so the run is the same FSDP program at any world size.
    Raises ValueError if `fsdp_blocks` names a class the model does not contain.
    """
    config = state.config
    blocks = find_blocks(model, config.fsdp_blocks)
    _join_single_process_group(state.device)
    if state.world_size > 1:
        _broadcast_from_rank0(model)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    options: dict[str, Any] = {
        "mesh": init_device_mesh(state.device.type, (dist.get_world_size(),)),
        "mp_policy": mixed_precision(config.precision),
        "offload_policy": (CPUOffloadPolicy(pin_memory=state.device.type != "cpu")
                           if config.fsdp_cpu_offload else OffloadPolicy()),
    }
    for block in blocks:
        fully_shard(block, reshard_after_forward=config.fsdp_reshard_after_forward, **options)
    # The root's parameters are needed again as soon as backward starts: keep them gathered.
    fully_shard(model, reshard_after_forward=False, **options)
    # Built under tl.empty_weights(): allocate and initialise this rank's shards only.
    materialize(model, state.device, config.seed)
    return {key: model.get_parameter(name) for key, name in names.items()}


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """FSDP's policy for a trainloop precision: compute in the autocast dtype, reduce in fp32.

    fp32 and bf16-true get no policy: their parameters already have the compute dtype.
    """
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def _join_single_process_group(device: torch.device) -> None:
    """fully_shard needs a process group; one process has none yet, so join one of one rank.

    The store lives in this process (no port, no rendezvous). `finish` leaves only the groups
    `init` joined, so this one is left at exit, before gloo's threads meet a dying interpreter.
    """
    if dist.is_initialized():
        return
    dist.init_process_group(dist.get_default_backend_for_device(device), store=dist.HashStore(),
                            rank=0, world_size=1)
    atexit.register(leave_process_group)


def _broadcast_from_rank0(model: nn.Module) -> None:
    """Make every rank's parameters and buffers rank 0's, as DDP's constructor does."""
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            if not tensor.is_meta:  # meta tensors get the same values on every rank later
                dist.broadcast(tensor.detach(), src=0)


# -- optimizers --------------------------------------------------------------------------------


def bind_optimizer(optimizer: torch.optim.Optimizer, replaced: dict[int, nn.Parameter]) -> None:
    """Point `optimizer`'s param groups at the sharded parameters, in place.

    Each parameter the optimizer holds is swapped for the shard that replaced it (`replaced`,
    from `shard`); parameters that are already shards stay. The optimizer
    object, its hyperparameters and any scheduler built on it are unchanged. Raises ValueError,
    changing nothing, if the optimizer has already stepped (its state is not sharded) or holds a
    tensor that is not a parameter of a model prepared with strategy='fsdp'.
    """
    name = type(optimizer).__name__
    if optimizer.state:
        raise ValueError(
            f"{name} has already taken steps: its state cannot be moved onto FSDP's shards. "
            "Prepare the optimizer before its first step"
        )
    for group in optimizer.param_groups:
        stray = sum(id(p) not in replaced and not isinstance(p, DTensor) for p in group["params"])
        if stray:
            raise ValueError(
                f"{name} holds {stray} tensor(s) that are not parameters of a model prepared with "
                "strategy='fsdp' (FSDP replaces each parameter by its shard, so these would never "
                "get a synchronised gradient). Build the optimizer from model.parameters() and pass "
                "it to the same tl.prepare call as its model, or build it after prepare"
            )
    rebind(optimizer, replaced)


