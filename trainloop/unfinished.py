"""Runs still unfinished when the interpreter exits: finished there, or warned about.

A script that ends without `tl.finish(state)` would lose its final checkpoint, its last report
and its background save in flight (the writer thread would try to use thread pools that the
interpreter has already shut down). So every prepared run is tracked (`trainloop.state.UNFINISHED`,
weakly: a run the program dropped is not kept alive), and a hook that runs when the main thread
ends, before
Python shuts down its thread pools (`threading._register_atexit`, which `concurrent.futures`
uses for the same purpose; registered after it, so called before it), ends the runs the
program still holds:

- One process, ended normally: the run is finished as `tl.finish` would (reports flushed,
  `on_finish` hooks: the final checkpoint, trackers closed; saves awaited), with one warning.
- Several processes, or an uncaught exception ending the program: nothing collective can run
  safely at exit (another rank may have exited already, or crashed), so only this process's
  background save in flight is completed, and one warning (main process) names what was lost.

A background save still being written for a run the program no longer holds (a script that
ended with `sys.exit` under `spawn`, say) is completed too (`trainloop.checkpoint.staging.IN_FLIGHT`).
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
from concurrent.futures import thread  # noqa: F401  its exit hook is registered first (see the end)
from typing import TYPE_CHECKING

from trainloop.checkpoint.staging import IN_FLIGHT
from trainloop.errors import RunEndWarning
from trainloop.lifecycle import finish, settle
from trainloop.state import UNFINISHED

if TYPE_CHECKING:
    from trainloop.state import RunState

_failed = False


def _at_exit() -> None:
    if not (UNFINISHED or IN_FLIGHT):
        return
    gc.collect()  # runs the program no longer holds are not finished
    crashed = getattr(sys, "last_value", None) is not None  # an uncaught exception ends the program
    for lineage in list(UNFINISHED):
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
    for future in list(IN_FLIGHT):  # the saves of runs the program no longer holds
        error = future.unreported_error()  # waits for the write
        if error is not None:
            _fail(f"trainloop: the background checkpoint save in flight at exit failed: {error}")


def _finish(state: RunState) -> None:
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
    """Exit handler: after a failure at exit, end the process with status 1 (the exit handlers
    registered before trainloop was imported are skipped)."""
    if _failed:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(1)


# Registered after concurrent.futures' own exit hook (imported above), so called before it: the
# pools a save in flight uses still take work.
threading._register_atexit(_at_exit)
atexit.register(_exit_status)
