"""The start and end of a run: init, attach, finish; and log_hparams, what a run records once."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from trainloop import precision, strategies
from trainloop.checkpoint import finish_saves
from trainloop.config import resolve_config
from trainloop.hooks import Callback, Hooks, overridden_hooks
from trainloop.state import RunState, raise_stale
from trainloop.steps import flush_logs
from trainloop.topology import join, leave_process_group


def init(*, callbacks: Iterable[Any] = (), **settings: Any) -> RunState:
    """Start a run: read the process topology, join the process group, seed every RNG.

    Settings, all optional keywords (what each does, and its default: README's table
    "Settings and precedence", or `python -m trainloop.spawn --help`): `precision`,
    `accumulate`, `strategy`, `seed`, `log_every`, `compile`, `timeout`, `device`, `blocks`,
    `even_batches`, `activation_checkpointing`; DDP's `ddp_find_unused_parameters`, `ddp_static_graph`,
    `ddp_gradient_as_bucket_view`, `ddp_bucket_cap_mb`, `ddp_comm_hook`; FSDP's
    `fsdp_reshard_after_forward`, `fsdp_cpu_offload`; the mesh's `dp_replicate`, `dp_shard`,
    `tp`, `tp_plan`. `TRAINLOOP_*` environment variables (set by
    `python -m trainloop.spawn --precision bf16 ...`) override them. The precision policy
    (`state.precision`) and the strategy (`state.strategy`) are built here, once.

    The process topology comes from the launcher's variables (RANK, WORLD_SIZE, LOCAL_RANK, ...,
    or SLURM's). With more than one process the default process group is joined with the
    device's default backend (gloo on CPU, nccl on CUDA) unless one is already joined. The
    device is the accelerator torch finds (one per local rank), else the CPU. Python's, NumPy's
    and torch's RNGs are seeded with `seed + rank`.

    Raises `SettingError` (a ValueError; `.setting` names the setting) for a bad value, TypeError
    for an unknown setting.
    """
    config = resolve_config(settings)
    callbacks = tuple(callbacks)
    _check_callbacks(callbacks)
    topology = join(config.device, config.timeout)
    _seed_everything(config.seed + topology.rank)
    policy = precision.policy(config.precision)
    if policy.loss_scaling:
        from trainloop.callbacks import LossScale

        if not any(isinstance(c, LossScale) for c in callbacks):
            callbacks = (LossScale(), *callbacks)  # fp16 gradients underflow without scaling
    return RunState(topology=topology, config=config, callbacks=callbacks, hooks=Hooks.of(callbacks),
                    strategy=strategies.create(config, topology), precision=policy)


def attach(state: RunState, *callbacks: Any) -> RunState:
    """The state with `callbacks` appended (they fire after the ones already attached).

    Attached after `prepare`, they get their `on_prepare` now, with the prepared objects
    registered (a late `Checkpoint(resume=True)` resumes here). `state` becomes stale.
    """
    state.check_current("attach")
    _check_callbacks(callbacks)
    prepared = state.models or state.optimizers or state.schedulers or state.loaders
    state = state.advance("attach", callbacks=(*state.callbacks, *callbacks))
    if prepared:
        for callback in callbacks:
            if "on_prepare" in overridden_hooks(callback):
                state = callback.on_prepare(state) or state
    return state


def finish(state: RunState) -> None:
    """End the run: report every value still buffered, fire `on_finish`, leave the process group.

    Values logged since the last report are reported at `state.step`, even when that step was
    just reported (a final `val_acc` logged after the last step): a tracker may then get two
    reports at one step. Every rank takes part in that report, also one with nothing buffered:
    a value logged on some ranks only raises the names error of `log` on every rank (the process
    group is still left). A background checkpoint save still in flight is waited for; if it
    failed unreported, CheckpointError is raised on every rank. The process group is left only
    if `init` joined it. Afterwards every state of the run is stale: the run is over.
    """
    state.check_current("finish")
    try:
        state = flush_logs(state, every_rank=True)
        for hook in state.hooks.on_finish:
            hook(state)
        finish_saves(state)  # waits for a background save; raises on every rank if it failed
    finally:
        state.lineage.finished = True
        state.lineage.generation += 1
        if state.topology.owns_process_group:
            leave_process_group()


def _check_callbacks(callbacks: tuple) -> None:
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


def log_hparams(state: RunState, hparams: Mapping[str, Any]) -> RunState:
    """Record hyper-parameters with every tracker; returns `state` (unchanged, still current).

    `hparams` maps names to numbers, strings, bools, None, lists of them, or nested mappings of
    them (`{"model": {"width": 8}}`, recorded as `model.width` where a store is flat). The
    trackers record them beside the run's settings: TensorBoard's hparams, the W&B config,
    MLflow params, a `<name>.hparams.json` beside a JSONLines or CSV file. Called before the
    first report, they are recorded when the tracker's run starts; later, at once. Main process
    only (any rank may call it; the others only check the values).
    """
    if state.lineage.finished:
        raise_stale(state, "log_hparams")
    checked = _plain_hparams(hparams, "")
    if state.is_main:
        for hook in state.hooks.on_log_hparams:
            hook(state, checked)
    return state


def _plain_hparams(mapping: Any, prefix: str) -> dict[str, Any]:
    """A copy of `mapping` with every value checked to be one a tracker can store."""
    if not isinstance(mapping, Mapping):
        raise TypeError(f"log_hparams takes a mapping of names to values (got {type(mapping).__name__})")
    plain: dict[str, Any] = {}
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise TypeError(f"log_hparams: keys must be strings (got {key!r})")
        name = prefix + key
        if isinstance(value, Mapping):
            plain[key] = _plain_hparams(value, name + ".")
        elif isinstance(value, (list, tuple)) and all(_is_plain(v) for v in value):
            plain[key] = list(value)
        elif _is_plain(value):
            plain[key] = value
        else:
            raise TypeError(f"log_hparams: {name!r} must be a number, string, bool or None, a list of "
                            f"them or a mapping (got {type(value).__name__}): convert it first, e.g. "
                            "tensor.item() or str(value)")
    return plain


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))
