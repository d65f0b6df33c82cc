"""The start and end of a run: init, attach, finish."""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import torch

from trainloop.checkpoint import finish_saves
from trainloop.config import resolve_config
from trainloop.state import Hooks, RunState
from trainloop.steps import flush_logs
from trainloop.topology import join, leave_process_group


def init(*, callbacks: Iterable[Any] = (), **settings: Any) -> RunState:
    """Start a run: read the process topology, join the process group, seed every RNG.

    Settings (all optional; see `trainloop.config.Config` for each one's meaning):
    `precision` ("fp32", "bf16", "fp16", "bf16-true", "fp8"), `accumulate` (micro-batches per
    optimizer step), `strategy` ("auto", "ddp", "fsdp"), `seed`, `log_every`, `compile`,
    `timeout` (seconds), `device`, and for FSDP `fsdp_blocks`, `fsdp_reshard_after_forward`,
    `fsdp_cpu_offload`. `TRAINLOOP_*` environment variables (set by
    `python -m trainloop.spawn --precision bf16 ...`) override them.

    The process topology comes from the launcher's variables (RANK, WORLD_SIZE, LOCAL_RANK, ...,
    or SLURM's). With more than one process the default process group is joined with the
    device's default backend (gloo on CPU, nccl on CUDA) unless one is already joined. The
    device is the accelerator torch finds (one per local rank), else the CPU. Python's, NumPy's
    and torch's RNGs are seeded with `seed + rank`.

    Raises ValueError naming the setting for a bad value, TypeError for an unknown setting.
    """
    config = resolve_config(settings)
    callbacks = tuple(callbacks)
    _check_callbacks(callbacks)
    topology = join(config.device, config.timeout)
    _seed_everything(config.seed + topology.rank)
    if config.precision == "fp16":
        from trainloop.callbacks import LossScale

        if not any(isinstance(c, LossScale) for c in callbacks):
            callbacks = (LossScale(), *callbacks)  # fp16 gradients underflow without scaling
    return RunState(topology=topology, config=config, callbacks=callbacks, hooks=Hooks.of(callbacks))


def attach(state: RunState, *callbacks: Any) -> RunState:
    """The state with `callbacks` appended (they fire after the ones already attached)."""
    _check_callbacks(callbacks)
    combined = (*state.callbacks, *callbacks)
    return state.evolve(callbacks=combined, hooks=Hooks.of(combined))


def finish(state: RunState) -> None:
    """End the run: report metrics still buffered, fire `on_finish`, leave the process group.

    The process group is left only if `init` joined it. A background checkpoint save still in
    flight is waited for; if it failed unreported, CheckpointError is raised on every rank.
    """
    if state.pending_logs is not None and state.step > state.logged_step:
        state = flush_logs(state)
    for hook in state.hooks.on_finish:
        hook(state)
    finish_saves(state)
    if state.topology.owns_process_group:
        leave_process_group()


def _check_callbacks(callbacks: tuple) -> None:
    from trainloop.callbacks import Callback

    for callback in callbacks:
        if not isinstance(callback, Callback):
            raise TypeError(
                f"callbacks must be trainloop.callbacks.Callback instances (got {type(callback).__name__}); "
                "subclass Callback and override the hooks you need"
            )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # every device's generator too
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(seed % 2**32)
