"""The start and end of a run: init, attach, finish (and, at exit, the runs a script never finished);
and log_hparams, what a run records once."""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import random
import sys
import threading
import traceback
import warnings
from collections.abc import Iterable, Mapping
from concurrent.futures import thread  # noqa: F401  its exit hook is registered first (see the end)
from typing import Any

import torch

from trainloop import precision, strategies
from trainloop.config import resolve_config
from trainloop.errors import RunEndWarning
from trainloop.hooks import Callback, Hooks, overridden_hooks
from trainloop.state import UNFINISHED, RunState, raise_stale
from trainloop.steps import flush_logs
from trainloop.topology import join, leave_process_group


def init(*, callbacks: Iterable[Any] = (), **settings: Any) -> RunState:
    """Start a run: read the process topology, join the process group, seed every RNG.

    Settings, all optional keywords (what each does, and its default: README's table
    "Settings and precedence", or `python -m trainloop.spawn --help`): `precision`,
    `fp8_recipe`, `fp8_filter`, `fp8_all_gather` (fp8's torchao recipe), `accumulate`, `strategy`,
    `seed`, `log_every`, `compile`, `compile_options`, `timeout`, `device`, `blocks`, `even_batches`, `activation_checkpointing`,
    `activation_checkpointing_every`; DDP's `ddp_find_unused_parameters`, `ddp_static_graph`,
    `ddp_gradient_as_bucket_view`, `ddp_bucket_cap_mb`, `ddp_comm_hook`; FSDP's
    `fsdp_reshard_after_forward`, `fsdp_shard_ends`, `fsdp_cpu_offload`; the mesh's `dp_replicate`, `dp_shard`,
    `tp`, `tp_plan`, `loss_parallel`. `TRAINLOOP_*` environment variables (set by
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
    policy = precision.policy(config.precision, config)  # fp8: its recipe's settings too
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

    `finish` is cleanup, meant for a `finally:` block. It accepts any state of its run and ends
    the run from the newest one: after a callback raised inside `tl.step`, the state the user
    holds is the one before that step, and the newest is the one the step made. Every part runs
    even when one before it failed; then the first failure is raised (the others as its notes).
    A second call does nothing.

    Values logged since the last report are reported at the newest state's step, even when that
    step was just reported (a final `val_acc` logged after the last step): a tracker may then get
    two reports at one step. Every rank takes part in that report, also one with nothing
    buffered: a value logged on some ranks only raises the names error of `log` on every rank. A
    background checkpoint save still in flight is waited for; if it failed unreported,
    CheckpointError is raised on every rank. The process group is left only if `init` joined it.
    Afterwards every state of the run is stale: the run is over.

    Called while an exception is in flight (from a `finally:` or `except` block), `finish` never
    replaces it: its own failures become `RunEndWarning`s. On several processes it then starts no
    collective (the other ranks may not be finishing: they could wait forever): only this
    process's background save in flight is completed, and a warning (main process) names what
    was not done: the final report and the `on_finish` hooks.
    """
    lineage = state.lineage
    if lineage.finished:
        return
    if state.generation != lineage.generation and lineage.newest is not None:
        state = lineage.newest
    in_flight = sys.exc_info()[1]
    failures: list[BaseException] = []
    try:
        if in_flight is not None and state.world_size > 1:
            failures += settle(state, f"an exception is in flight ({type(in_flight).__name__}): "
                                      "no collective is started")
        else:
            failures += _end(state)
    finally:
        lineage.finished = True
        lineage.generation += 1
        lineage.newest = None
        UNFINISHED.discard(lineage)
        if state.topology.owns_process_group:
            leave_process_group()
    if not failures:
        return
    if in_flight is not None:
        for failure in failures:
            warnings.warn(f"tl.finish: {type(failure).__name__}: {failure} (not raised: the exception in "
                          f"flight, {type(in_flight).__name__}, is the one that propagates)",
                          RunEndWarning, stacklevel=2)
        return
    for failure in failures[1:]:
        failures[0].add_note(f"tl.finish also failed with {type(failure).__name__}: {failure}")
    raise failures[0]


def _end(state: RunState) -> list[BaseException]:
    """Every part of ending the run, each attempted whatever the ones before did; their failures."""
    failures: list[BaseException] = []
    try:
        state = flush_logs(state, every_rank=True)
    except Exception as failure:  # the names error of `log`, on every rank alike
        failures.append(failure)
    for hook in state.hooks.on_finish:
        try:
            hook(state)
        except Exception as failure:
            failures.append(failure)
    try:
        from trainloop.checkpoint import finish_saves  # imported on first use: `import trainloop` stays light

        finish_saves(state)  # waits for a background save; raises on every rank if it failed
    except Exception as failure:
        failures.append(failure)
    return failures


def settle(state: RunState, why: str) -> list[BaseException]:
    """End the run without a collective: complete this process's background save in flight,
    and (main process) warn naming what is lost. The save's failure, if any, is returned."""
    writer = state.lineage.writer
    error = writer.wait() if writer is not None else None
    if writer is not None:
        writer.release()
    if state.is_main:
        message = (f"the run ended without tl.finish(state) ({why}): lost {_lost(state)}. This process's "
                   "background save in flight, if any, was completed")
        warnings.warn(message, RunEndWarning, stacklevel=3)
    return [] if error is None else [error]


def _lost(state: RunState) -> str:
    """What ending the run without its report and `on_finish` hooks loses, in words."""
    lost = []
    for callback in state.callbacks:
        unsaved = getattr(callback, "unsaved_at_finish", None)  # the Checkpoint callback's
        if unsaved is not None and unsaved(state):
            lost.append(f"the final checkpoint at step {state.step} ({type(callback).__name__})")
        elif "on_finish" in overridden_hooks(callback):
            lost.append(f"the on_finish of {type(callback).__name__}")
    if state.pending_logs is not None:
        lost.append(f"the values logged since the report at step {state.logged_step}")
    return ", ".join(lost) or "nothing but the end of the run"


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


# -- runs still unfinished when the interpreter exits --------------------------------------------
#
# Runs still unfinished when the interpreter exits: finished there, or warned about.
#
# A script that ends without `tl.finish(state)` would lose its final checkpoint, its last report
# and its background save in flight (the writer thread would try to use thread pools that the
# interpreter has already shut down). So every prepared run is tracked (`trainloop.state.UNFINISHED`,
# weakly: a run the program dropped is not kept alive), and a hook that runs when the main thread
# ends, before
# Python shuts down its thread pools (`threading._register_atexit`, which `concurrent.futures`
# uses for the same purpose; registered after it, so called before it), ends the runs the
# program still holds:
#
# - One process, ended normally: the run is finished as `tl.finish` would (reports flushed,
#   `on_finish` hooks: the final checkpoint, trackers closed; saves awaited), with one warning.
# - Several processes, or an uncaught exception ending the program: nothing collective can run
#   safely at exit (another rank may have exited already, or crashed), so only this process's
#   background save in flight is completed, and one warning (main process) names what was lost.
#
# A background save still being written for a run the program no longer holds (a script that
# ended with `sys.exit` under `spawn`, say) is completed too (`trainloop.checkpoint.staging.IN_FLIGHT`).
# A save that fails at exit, or a finish that fails there, is printed and the process exits with
# status 1: a lost checkpoint is never an exit status of 0.

_failed_at_exit = False


def _saves_in_flight() -> set:
    """The background saves still being written; none if this process never imported the
    checkpoint modules (it cannot have saved)."""
    staging = sys.modules.get("trainloop.checkpoint.staging")
    return staging.IN_FLIGHT if staging is not None else set()


def _at_exit() -> None:
    if not (UNFINISHED or _saves_in_flight()):
        return
    gc.collect()  # runs the program no longer holds are not finished
    crashed = getattr(sys, "last_value", None) is not None  # an uncaught exception ends the program
    for lineage in list(UNFINISHED):
        state = lineage.newest
        if lineage.finished or state is None:
            continue
        try:
            if state.world_size == 1 and not crashed:
                _finish_at_exit(state)
                continue
            why = ("an uncaught exception ended the program" if crashed else
                   f"on {state.world_size} processes nothing collective can run at exit")
            for error in settle(state, why + "; end the run in a `finally:` block"):
                _fail(f"trainloop: the background checkpoint save in flight at exit failed: {error}")
        except BaseException:  # at exit there is no caller left to raise to
            _fail("trainloop: ending the unfinished run at exit failed:\n" + traceback.format_exc())
    for future in list(_saves_in_flight()):  # the saves of runs the program no longer holds
        error = future.unreported_error()  # waits for the write
        if error is not None:
            _fail(f"trainloop: the background checkpoint save in flight at exit failed: {error}")


def _finish_at_exit(state: RunState) -> None:
    message = (f"the script ended without tl.finish(state): the run was finished at exit (step {state.step}): "
               "values still buffered were reported, on_finish hooks ran (the final checkpoint, the "
               "trackers closed) and saves were awaited. End the run yourself at the end of the script, "
               "so that its errors are raised where they can be caught")
    warnings.warn(message, RunEndWarning, stacklevel=1)
    finish(state)


def _fail(message: str) -> None:
    global _failed_at_exit
    _failed_at_exit = True
    print(message, file=sys.stderr, flush=True)


def _exit_status() -> None:
    """Exit handler: after a failure at exit, end the process with status 1 (the exit handlers
    registered before trainloop was imported are skipped)."""
    if _failed_at_exit:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(1)


# Registered after concurrent.futures' own exit hook (imported above), so called before it: the
# pools a save in flight uses still take work.
threading._register_atexit(_at_exit)
atexit.register(_exit_status)
