"""The one seam between trainloop's core and the ways of spreading a model over processes.

`prepare`, `accumulate`, the checkpoint functions and the callbacks call a run's strategy
(`state.strategy`) through this protocol and never ask which strategy it is. Each strategy is
one module of this package: `local` (one process, nothing to synchronise), `ddp`
(DistributedDataParallel), `fsdp` (FSDP2 `fully_shard`). `trainloop.strategies.create` picks one
from the settings, once, in `init`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from trainloop.errors import SettingError

if TYPE_CHECKING:
    from trainloop.config import Config
    from trainloop.topology import Topology


class Strategy(Protocol):
    """What the core needs from a strategy. Methods that say "collective" run on every rank.

    A strategy is built once from the run's settings and this process's place in the job
    (`trainloop.strategies.create(config, topology)`) and needs nothing else: no `RunState`.
    """

    #: The `strategy` setting this object implements ("local", "ddp", "fsdp").
    name: str
    #: True when checkpoints hold each rank's shards (torch.distributed.checkpoint) instead of
    #: whole weights written by rank 0; a sharded run refuses to resume from whole weights.
    sharded: bool

    def wrap(self, model: nn.Module) -> tuple[nn.Module, dict[int, nn.Parameter]]:
        """Make `model` (on its device, precision-cast) ready for the strategy. Collective.

        Returns the model to hand on (a wrapper, or the model sharded in place) and
        id(parameter before) -> the parameter that replaced it, for `bind_optimizer`.
        """
        ...

    def bind_optimizer(self, optimizer: torch.optim.Optimizer, replaced: dict[int, nn.Parameter]) -> None:
        """Point an optimizer built before `prepare` at the parameters `wrap` put in place."""

    def no_sync(self, models: Sequence[nn.Module]) -> contextlib.AbstractContextManager:
        """A context in which backward accumulates gradients locally, unsynchronised."""
        ...

    def data_parallel(self) -> tuple[int, int]:
        """(rank, size) of this process among the data-parallel replicas: loaders shard by it."""
        ...

    def data_parallel_group(self) -> Any:
        """The process group of the ranks that see different batches, with this one; None: all ranks.

        Not None only under tensor parallelism, whose ranks of one group see the same batch:
        gathering over every rank would count each of its rows once per tensor-parallel rank.
        """

    def grad_norm(self, grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
        """The total `norm_type` norm of the gradients of every rank's parameters (a plain tensor)."""
        ...

    def scale_grads_(self, grads: list[torch.Tensor], factor: float | torch.Tensor) -> None:
        """Multiply the gradients by `factor` (a number or a scalar tensor), in place."""

    def clip_grads_(self, grads: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
        """Scale the gradients so that their total norm `total_norm` is at most `max_norm`."""


def rebind(optimizer: torch.optim.Optimizer, replaced: dict[int, nn.Parameter]) -> None:
    """Point `optimizer`'s param groups at the replacements (id -> parameter), in place.

    Raises ValueError, changing nothing, if a parameter would stay on the meta device: it
    would never get a gradient, so the optimizer would silently not train it.
    """
    left = sum(p.is_meta and id(p) not in replaced for group in optimizer.param_groups for p in group["params"])
    if left:
        raise ValueError(
            f"{type(optimizer).__name__} holds {left} parameter(s) still on the meta device: pass the "
            "optimizer to the same tl.prepare call as its model (built under tl.empty_weights()), "
            "or build it after prepare"
        )
    for group in optimizer.param_groups:
        # In place: optimizers that keep this list (LBFGS) see the new parameters.
        group["params"][:] = [replaced.get(id(p), p) for p in group["params"]]


def refuse_mesh(config: Config, strategy: str) -> None:
    """Raise SettingError for mesh settings that only `strategy="fsdp"` implements."""
    mesh = config.mesh
    if mesh.tp != 1 or mesh.dp_replicate != 1:
        raise SettingError(
            "tp" if mesh.tp != 1 else "dp_replicate",
            f"dp_replicate={mesh.dp_replicate} and tp={mesh.tp} need strategy='fsdp' (HSDP and "
            f"tensor parallelism compose with FSDP2); strategy={strategy!r} replicates the whole model: "
            "use strategy='fsdp', or leave dp_replicate and tp at 1"
        )


def clip(strategy: Strategy, grads: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """`torch.nn.utils.clip_grads_with_norm_`'s arithmetic, scaling through the strategy."""
    coefficient = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    strategy.scale_grads_(grads, coefficient)


class WholeModel:
    """Shared behaviour of the strategies that keep a whole copy of the model on every rank."""

    name = "local"
    sharded = False

    def __init__(self, config: Config, topology: Topology):
        self._config = config
        self._rank, self._world_size, self._device = topology.rank, topology.world_size, topology.device

    def bind_optimizer(self, optimizer: torch.optim.Optimizer, replaced: dict[int, nn.Parameter]) -> None:
        """Swap in the parameters a meta model's materialisation replaced; others stay."""
        rebind(optimizer, replaced)

    def data_parallel(self) -> tuple[int, int]:
        return self._rank, self._world_size

    def data_parallel_group(self) -> Any:
        return None

    def grad_norm(self, grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
        return torch.nn.utils.get_total_norm(grads, norm_type)

    def scale_grads_(self, grads: list[torch.Tensor], factor: float | torch.Tensor) -> None:
        if isinstance(factor, torch.Tensor):
            factor = factor.to(grads[0].device)
        torch._foreach_mul_(grads, factor)

    def clip_grads_(self, grads: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
        clip(self, grads, max_norm, total_norm)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
