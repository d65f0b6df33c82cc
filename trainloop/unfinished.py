"""Runs still unfinished when the interpreter exits: finished there, or warned about.

A script that ends without `tl.finish(state)` would lose its final checkpoint, its last report
and its background save in flight (the writer thread would try to use thread pools that the
interpreter has already shut down). So every prepared run is tracked here (weakly: a run the
program dropped is not kept alive), and a hook that runs when the main thread ends, before
Python shuts down its thread pools (`threading._register_atexit`, which `concurrent.futures`
uses for the same purpose; registered after it, so called before it), ends the runs the
program still holds:

- One process, ended normally: the run is finished as `tl.finish` would (reports flushed,
  `on_finish` hooks: the final checkpoint, trackers closed; saves awaited), with one warning.
- Several processes, or an uncaught exception ending the program: nothing collective can run
  safely at exit (another rank may have exited already, or crashed), so only this process's
  background save in flight is completed, and one warning (main process) names what was lost.

A save that fails at exit, or a finish that fails there, is printed and the process exits with
status 1: a lost checkpoint is never an exit status of 0.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
import threading
import traceback
import warnings
import weakref
from typing import TYPE_CHECKING

from trainloop.errors import RunEndWarning

if TYPE_CHECKING:
    from trainloop.state import Lineage, RunState

_runs: weakref.WeakSet[Lineage] = weakref.WeakSet()
_hooked = False
_failed = False


def track(lineage: Lineage) -> None:
    """Finish (or warn about) the run of `lineage` at exit unless `tl.finish` ends it first."""
    global _hooked
    if not _hooked:
        import concurrent.futures.thread  # noqa: F401  its exit hook first, so that ours runs before it

        threading._register_atexit(_at_exit)
        atexit.register(_exit_status)
        _hooked = True
    _runs.add(lineage)


def forget(lineage: Lineage) -> None:
    _runs.discard(lineage)


def settle(state: RunState, why: str) -> list[Exception]:
    """End the run without a collective: complete this process's background save in flight,
    and (main process) warn naming what is lost. The save's failure, if any, is returned."""
    writer = state.lineage.writer
    error = writer.wait() if writer is not None else None
    if writer is not None:
        writer.release()
    if state.is_main:
        message = (f"the run ended without tl.finish(state) ({why}): lost {lost(state)}. This process's "
                   "background save in flight, if any, was completed")
        warnings.warn(message, RunEndWarning, stacklevel=3)
    return [] if error is None else [error]


def lost(state: RunState) -> str:
    """What ending the run without its report and `on_finish` hooks loses, in words."""
    from trainloop.hooks import overridden_hooks

    lost = []
    for callback in state.callbacks:
        unsaved = getattr(callback, "unsaved_at_finish", None)
        if unsaved is not None and unsaved(state):
            lost.append(f"the final checkpoint at step {state.step} ({type(callback).__name__})")
        elif "on_finish" in overridden_hooks(callback):
            lost.append(f"the on_finish of {type(callback).__name__}")
    if state.pending_logs is not None:
        lost.append(f"the values logged since the report at step {state.logged_step}")
    return ", ".join(lost) or "nothing but the end of the run"


def _at_exit() -> None:
    gc.collect()  # runs the program no longer holds are not finished
    crashed = getattr(sys, "last_value", None) is not None  # an uncaught exception ends the program
    for lineage in list(_runs):
        state = lineage.newest
        if lineage.finished or state is None:
            continue
        try:
            if state.world_size == 1 and not crashed:
                _finish(state)
                continue
            why = ("an uncaught exception ended the program" if crashed else
                   f"on {state.world_size} processes nothing collective can run at exit")
            for error in settle(state, why + "; end the run in a `finally:` block"):
                _fail(f"trainloop: the background checkpoint save in flight at exit failed: {error}")
        except BaseException:  # at exit there is no caller left to raise to
            _fail("trainloop: ending the unfinished run at exit failed:\n" + traceback.format_exc())


def _finish(state: RunState) -> None:
    from trainloop.lifecycle import finish

    message = (f"the script ended without tl.finish(state): the run was finished at exit (step {state.step}): "
               "values still buffered were reported, on_finish hooks ran (the final checkpoint, the "
               "trackers closed) and saves were awaited. End the run yourself at the end of the script, "
               "so that its errors are raised where they can be caught")
    warnings.warn(message, RunEndWarning, stacklevel=1)
    finish(state)


def _fail(message: str) -> None:
    global _failed
    _failed = True
    print(message, file=sys.stderr, flush=True)


def _exit_status() -> None:
    """Exit handler: after a failure at exit, end the process with status 1 (the handlers
    registered before this one, at trainloop's first prepare, are skipped)."""
    if _failed:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(1)
