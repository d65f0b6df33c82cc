"""FSDP2 for `init(strategy="fsdp")`: shard models, bind optimizers, gather for export.

`FullyShard.wrap` calls `shard` for each model: rank 0's parameters and buffers are broadcast,
then `torch.distributed.fsdp.fully_shard` wraps each block (innermost first) and finally the root.
Blocks are the modules whose class names `init(blocks="Block,Head")` gives, or by default
those a model declares in `_no_split_modules`, else the children of its largest `nn.ModuleList`
(a transformer's layers); a model with neither is sharded at the root only, with a warning. Each block's parameters are gathered for
its forward and backward and freed after, so a rank holds one block unsharded at a time.

Sharding replaces every parameter by a new `DTensor` parameter. An optimizer built before
`prepare` still points at the old ones; `bind_optimizer` swaps its param groups over to the
shards in place, so the optimizer object (and any scheduler stepping it) stays the same.

Checkpoints are sharded (`sharded = True`): every rank writes its shards through
torch.distributed.checkpoint (`trainloop.checkpoint.distcp`), and a later run at any world size reads the
pieces it needs.

FSDP's own options are the record `FSDPOptions` (`config.fsdp`; the settings `fsdp_*`), the
mesh's `MeshOptions` (`trainloop.strategies.mesh`). `Config` nests `FSDPOptions`, so every run imports this
module: torch.distributed.fsdp, .tensor and .checkpoint (about a second together) are imported
inside the functions that use them, which only FSDP runs call.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch

import torch.distributed as dist
from torch import nn

from trainloop import precision
from trainloop.forwarding import unwrap
from trainloop.models.meta import materialize
from trainloop.settings import Settings, boolean, is_boolean, setting
from trainloop.strategies import blocks
from trainloop.strategies.base import clip, rebind
from trainloop.strategies.mesh import Mesh, build_mesh, mesh_shape, refuse_combinations
from trainloop.topology import leave_process_group

if TYPE_CHECKING:
    from trainloop.config import Config
    from trainloop.topology import Topology


@attrs.frozen
class FSDPOptions(Settings):
    """FSDP2's own options: the settings `fsdp_<field>`."""

    prefix = "fsdp_"

    reshard_after_forward: bool = setting(
        True, parse=boolean, check=[is_boolean],
        help="strategy fsdp: free each block's gathered parameters after its forward and gather "
             "them again for backward (less memory, more communication)")
    shard_ends: bool = setting(
        True, parse=boolean, check=[is_boolean],
        help="strategy fsdp: shard the modules before the blocks (the embedding) and after them "
             "(the final norm and the output head) as two units of their own, as torchtitan does, "
             "instead of keeping them gathered in the root for the whole step; the head's unit is "
             "not resharded after forward")
    cpu_offload: bool = setting(
        False, parse=boolean, check=[is_boolean],
        help="strategy fsdp: keep the sharded parameters, gradients and optimizer state in CPU "
             "memory; the optimizer steps on the CPU")


class FullyShard:
    """The strategy of `strategy="fsdp"`, on any number of processes (one included)."""

    name = "fsdp"
    sharded = True

    def __init__(self, config: Config, topology: Topology):
        # fully_shard imports torch._dynamo on its first call: about 25 MB of Python objects that
        # stay resident for the rest of the process, and 1 s. Imported here (at init, FSDP runs
        # only; never by `import trainloop`), it is part of the run's start-up instead of the first
        # prepare, where it would count against meta-init's promise that a rank holds its shards
        # and little more while building and loading.
        import torch._dynamo  # noqa: F401

        self.config, self.topology = config, topology
        refuse_combinations(config)
        self.shape = mesh_shape(config.mesh, topology.world_size)  # checked in init, built on first use
        self._rank, self._device = topology.rank, topology.device
        self._mesh: Mesh | None = None
        self._units: dict[nn.Module, list[Any]] = {}  # prepared model -> its FSDP units (no_sync)

    def mesh(self, device: torch.device) -> Mesh:
        """The run's device meshes (a collective the first time: every rank builds them)."""
        if self._mesh is None:
            _join_single_process_group(device)
            self._mesh = build_mesh(self.shape, device.type)
        return self._mesh

    def wrap(self, model: nn.Module) -> tuple[nn.Module, dict[int, nn.Parameter]]:
        # In place, also on one process; under compile, the user's module inside the wrapper.
        return model, shard(unwrap(model), self.mesh(self._device), self.config, self.topology)

    def bind_optimizer(self, optimizer: torch.optim.Optimizer, replaced: dict[int, nn.Parameter]) -> None:
        bind_optimizer(optimizer, replaced)

    def no_sync(self, models: Sequence[nn.Module]) -> contextlib.AbstractContextManager:
        # Each prepared model's FSDP units are found once: `set_requires_gradient_sync` walks
        # every submodule each call otherwise, twice per micro-step (a cost raw loops pay once).
        units = []
        for model in models:
            found = self._units.get(model)
            if found is None:
                found = self._units[model] = _fsdp_units(unwrap(model))
            units.extend(found)
        return _no_gradient_sync(units)

    def data_parallel(self) -> tuple[int, int]:
        # Ranks are laid out row-major over (dp_replicate, dp_shard, tp): a tensor-parallel group
        # is `tp` neighbours, who share one data-parallel rank (mesh.data_parallel_rank, unbuilt).
        return self._rank // self.shape.tp, self.shape.data_parallel_size

    def data_parallel_group(self) -> Any:
        if self.shape.tp == 1:
            return None
        return self.mesh(self._device).data_parallel_group  # a collective the first time, as callers are

    def grad_norm(self, grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
        # Gradients live on up to two meshes (with TP: the 2-D one of the TP-sharded layers, the
        # dp one of the others): the norm of each group, reduced over its ranks (full_tensor),
        # then the norm of those norms, which is the total norm for any p (max for inf).
        from torch.distributed.tensor import DTensor

        norms = []
        for group in _by_mesh(grads).values():
            norm = torch.nn.utils.get_total_norm(group, norm_type)
            norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        return norms[0] if len(norms) == 1 else torch.nn.utils.get_total_norm(norms, norm_type)

    def scale_grads_(self, grads: list[torch.Tensor], factor: float | torch.Tensor) -> None:
        # One foreach per mesh: DTensor ops refuse operands on different meshes (TP + FSDP).
        if isinstance(factor, torch.Tensor):
            factor = factor.to(grads[0].device)
        for group in _by_mesh(grads).values():
            torch._foreach_mul_(group, factor)

    def clip_grads_(self, grads: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
        clip(self, grads, max_norm, total_norm)

    def __repr__(self) -> str:
        return "FullyShard()"


def _by_mesh(grads: list[torch.Tensor]) -> dict[Any, list[torch.Tensor]]:
    from torch.distributed.tensor import DTensor

    groups: dict[Any, list[torch.Tensor]] = {}
    for grad in grads:
        groups.setdefault(grad.device_mesh if isinstance(grad, DTensor) else None, []).append(grad)
    return groups


def _fsdp_units(model: nn.Module) -> list[Any]:
    """The FSDP units (`fully_shard`ed modules) in `model`, itself included if it is one."""
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.modules() if isinstance(module, FSDPModule)]


@contextlib.contextmanager
def _no_gradient_sync(units: list[Any]):
    for unit in units:
        unit.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_requires_gradient_sync(True, recurse=False)


# -- sharding ----------------------------------------------------------------------------------


def shard(model: nn.Module, mesh: Mesh, config: Config, topology: Topology) -> dict[int, nn.Parameter]:
    """Parallelise `model` (on `topology.device`) over `mesh`, in place: TP, blocks, FSDP2, storage.

    In this order (torchtitan's): tensor parallelism over the "tp" dimension when tp > 1
    (`trainloop.strategies.tensor_parallel`, the plan `tp_plan` or the Hugging Face model's own); the
    blocks' activation checkpointing and compile (`blocks.apply`); FSDP2 on each block, then the
    root, over the data-parallel dimensions (HSDP when dp_replicate > 1: sharded within a
    replica, replicated across them); a meta model's storage.

    Returns id(parameter before sharding) -> the shard that replaced it, for `bind_optimizer`.

    Afterwards its parameters are `DTensor` shards. Parameters and buffers are rank 0's on every
    rank; a model built on the meta device gets storage for its shards only, initialised by the
    model's own init hook or each module's `reset_parameters()` (`trainloop.models.meta.materialize`).
    Mixed precision follows
    `config.precision` (its policy's `fsdp_policy()`): under bf16 (and fp8) and fp16 the gathered parameters and the
    compute are in that dtype while the sharded parameters, the optimizer and the gradient
    reduction stay fp32. On one process a single-rank process group is joined, so the run is the
    same FSDP program at any world size. Raises ValueError if `blocks` names a class the
    model does not contain.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    device = topology.device
    if topology.world_size > 1:
        _broadcast_from_rank0(model)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    if mesh.shape.tp > 1:
        from trainloop.strategies.tensor_parallel import apply_tp_plan

        apply_tp_plan(model, mesh.tp_mesh, config.mesh.tp_plan, loss_parallel=config.mesh.loss_parallel)
    found = blocks.apply(model, config, warn=True)  # as they now sit: checkpoint-wrapped, compiled
    options: dict[str, Any] = {
        "mesh": mesh.fsdp_mesh,
        "mp_policy": precision.policy(config.precision).fsdp_policy(),
        "offload_policy": (CPUOffloadPolicy(pin_memory=device.type != "cpu")
                           if config.fsdp.cpu_offload else OffloadPolicy()),
    }
    for block in found:
        fully_shard(block, reshard_after_forward=config.fsdp.reshard_after_forward, **options)
    if found and config.fsdp.shard_ends:
        before, after = end_units(model, found)
        if before:
            fully_shard(before, reshard_after_forward=config.fsdp.reshard_after_forward, **options)
        if after:
            # The first unit backward needs: resharding it after forward would gather it again at once.
            fully_shard(after, reshard_after_forward=False, **options)
    # The root's parameters are needed again as soon as backward starts: keep them gathered.
    fully_shard(model, reshard_after_forward=False, **options)
    # Built under tl.empty_weights(): allocate and initialise this rank's shards only.
    materialize(model, device, config.seed)
    # Tensor parallelism and FSDP replaced the parameters; checkpoint_wrapper renamed their paths.
    now = {_without_wrappers(name): parameter for name, parameter in model.named_parameters()}
    return {key: now[name] for key, name in names.items()}


def end_units(model: nn.Module, found: list[nn.Module]) -> tuple[list[nn.Module], list[nn.Module]]:
    """The modules outside the blocks that hold parameters: those before the blocks, those after.

    torchtitan's units: the embedding (before), the final norm with the output head (after). They
    are sharded as two units of their own instead of staying gathered in the root for the whole
    step. A parameter both groups share (a head tied to the embedding) keeps both in the root:
    FSDP2 cannot shard one parameter in two units.
    """
    inside = {id(m) for block in found for m in block.modules()}
    order = [m for m in model.modules() if m is not model]
    first = min(i for i, m in enumerate(order) if id(m) in inside)
    owners = [(i, m) for i, m in enumerate(order)
              if id(m) not in inside and any(True for _ in m.parameters(recurse=False))]
    before = [m for i, m in owners if i < first]
    after = [m for i, m in owners if i > first]
    shared = {id(p) for m in before for p in m.parameters()} & {id(p) for m in after for p in m.parameters()}
    if shared:
        return [], []
    return before, after


def _without_wrappers(name: str) -> str:
    """A parameter's name without the `_checkpoint_wrapped_module.` that checkpoint_wrapper inserts."""
    return name.replace("_checkpoint_wrapped_module.", "")


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
    from torch.distributed.tensor import DTensor

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


