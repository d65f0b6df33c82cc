"""`prepare`: make the user's model, optimizer, loader and scheduler ready for this run.

Objects come back in the order they were given. Models are prepared first, whatever the order,
so that optimizers can be checked against (and, under FSDP, rebound to) the final parameters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from trainloop.data import PreparedLoader
from trainloop.data.kept import KeptLoader
from trainloop.forwarding import refuse_prepared
from trainloop.models.meta import move_real_tensors
from trainloop.optimizers import guard_optimizer
from trainloop.state import RunState

_SUPPORTED = "nn.Module, torch.optim.Optimizer, torch.utils.data.DataLoader, torch.optim.lr_scheduler.LRScheduler"


def prepare(state: RunState, *objects: Any, shard: bool = True, move_to_device: bool = True) -> tuple[Any, ...]:
    """Prepare models, optimizers, loaders and LR schedulers; register them in the state.

    Returns `(new_state, *prepared)`, the prepared objects in the order given:

    - `nn.Module`: moved to `state.device`; wrapped for the precision (autocast around its
      forward) and for the run's strategy (`state.strategy`, `trainloop.strategies`): on many
      ranks in DistributedDataParallel (rank 0's parameters and buffers are broadcast, so every
      rank starts from the same model however it was built); with `strategy="fsdp"` sharded in
      place with FSDP2 instead, on any number of ranks.
    - `Optimizer`: the same object, still bound to the (moved) parameters; under FSDP its param
      groups are pointed at the shards in place (prepare it with its model, before it steps).
      Its `step()` is trainloop's from now on: called by hand it raises, naming `tl.step`.
    - `DataLoader`: a `PreparedLoader`: sharded over the data-parallel ranks, batches on the
      device, seeded shuffling, resumable position. With `shard=False`, the user's loader is
      kept as it is (already sharded, e.g. by a `DistributedSampler`, or a subclass with its own
      iteration): `trainloop.data.kept`.
    - LR scheduler: the same object; `tl.step` steps it once per optimizer step.

    `move_to_device=False`: models stay where they are and batches where the loader puts them
    (the user places them).

    Then the `on_prepare` hooks fire (a `Checkpoint(resume=True)` restores the run there).
    Use the state returned: it registers the objects (`state` itself stays usable as a base,
    e.g. for preparing a second, independent run).
    Raises TypeError for any other object (or a DataLoader subclass whose own methods the
    re-built loader would drop, without `shard=False`), and ValueError for an object prepared
    twice, in this run or another (a prepared model would be wrapped twice).
    """
    state.check_current("prepare")
    if not objects:
        raise TypeError(f"prepare needs at least one object to prepare ({_SUPPORTED})")
    registered = (*state.models, *state.optimizers, *state.schedulers, *state.loaders)
    for obj in objects:
        _check_supported(obj)
        if any(obj is seen for seen in registered) or sum(obj is other for other in objects) > 1:
            raise ValueError(f"{type(obj).__name__} was already prepared; prepare each object once")
        if isinstance(obj, nn.Module):
            refuse_prepared(obj)

    prepared: dict[int, Any] = {}
    models, optimizers, schedulers, loaders = [], [], [], []
    # A strategy may replace parameters (FSDP: by their shards): id(original) -> replacement.
    replaced: dict[int, nn.Parameter] = {}
    for index, obj in enumerate(objects):
        if isinstance(obj, nn.Module):
            prepared[index], sharded = _prepare_model(state, obj, move_to_device)
            replaced.update(sharded)
            models.append(prepared[index])
    dp_rank, dp_size = state.strategy.data_parallel()
    for index, obj in enumerate(objects):
        if isinstance(obj, torch.optim.Optimizer):
            # Point the optimizer at the replacements in place, so the object the user holds (and
            # any scheduler on it) stays the one that trains; refuse one that cannot be.
            state.strategy.bind_optimizer(obj, replaced)
            prepared[index] = obj
            optimizers.append(obj)
        elif isinstance(obj, DataLoader) and not shard:
            prepared[index] = KeptLoader(obj, device=state.device, move_to_device=move_to_device)
            loaders.append(prepared[index])
        elif isinstance(obj, DataLoader):
            prepared[index] = PreparedLoader(obj, device=state.device, rank=dp_rank,
                                             world_size=dp_size, seed=state.config.seed,
                                             even_batches=state.config.even_batches,
                                             move_to_device=move_to_device)
            loaders.append(prepared[index])
    all_optimizers = (*state.optimizers, *optimizers)
    for index, obj in enumerate(objects):
        if _is_scheduler(obj):
            if not any(obj.optimizer is opt for opt in all_optimizers):
                raise ValueError(
                    f"{type(obj).__name__} steps an optimizer that was not prepared: "
                    "pass its optimizer to prepare too"
                )
            prepared[index] = obj
            schedulers.append(obj)

    state = state.branch(
        "prepare",
        models=(*state.models, *models),
        optimizers=all_optimizers,
        schedulers=(*state.schedulers, *schedulers),
        loaders=(*state.loaders, *loaders),
    )
    for optimizer in optimizers:
        guard_optimizer(optimizer, state.lineage)
    for hook in state.hooks.on_prepare:
        state = hook(state) or state
    return (state, *(prepared[i] for i in range(len(objects))))


def _is_scheduler(obj: Any) -> bool:
    return isinstance(obj, (torch.optim.lr_scheduler.LRScheduler,
                            torch.optim.lr_scheduler.ReduceLROnPlateau))


def _check_supported(obj: Any) -> None:
    if isinstance(obj, PreparedLoader):
        raise ValueError("this loader was already prepared; prepare each object once")
    if not isinstance(obj, (nn.Module, torch.optim.Optimizer, DataLoader)) and not _is_scheduler(obj):
        raise TypeError(f"prepare cannot prepare a {type(obj).__name__}; it supports {_SUPPORTED}")


def _prepare_model(state: RunState, model: nn.Module,
                   move_to_device: bool = True) -> tuple[nn.Module, dict[int, nn.Parameter]]:
    """Device, dtype, activation checkpointing, compile, the strategy's wrapper, then autocast.

    Returns the prepared model and the parameters the strategy replaced (id -> replacement).
    """
    # A model built under tl.empty_weights() keeps its meta tensors: the strategy allocates them.
    if move_to_device:
        model = move_real_tensors(model, state.device)
    model = state.precision.cast(model, state.device)
    # Activation checkpointing and compile="blocks" act on the blocks: the strategy applies them
    # (after tensor parallelism, before sharding or DDP, as torchtitan orders them).
    if state.config.compile is True:
        # Compile the module, then wrap it, as torch's "Where to apply torch.compile?" advises
        # (dynamo does not trace DDP/FSDP wrappers well). Inside DDP's forward, dynamo still splits
        # the graph at DDP's bucket boundaries (DDPOptimizer), so the all-reduce overlaps the
        # backward. After the cast: float8 layers are compiled too. Autocast stays outside:
        # dynamo guards on the autocast state and traces the casts into the graph.
        model = torch.compile(model, **(state.config.compile_options or {}))  # pyright: ignore[reportAssignmentType]  (an OptimizedModule)
    model, replaced = state.strategy.wrap(model)
    return state.precision.wrap(model, state.device), replaced
