"""The start of every worker that `trainloop.spawn` launches: die with the launcher, then run.

    python -m trainloop.worker LAUNCHER_PID script.py ARGS...       # what spawn runs for a script
    python -m trainloop.worker LAUNCHER_PID -m package.module ARGS...

A launcher killed with SIGKILL (the OOM killer, a scheduler's hard kill) cannot stop its workers:
torch's agent never gets to run. Script workers also run in their own session, so nothing else
reaches them, and they would train on, holding their accelerators, until a collective timed out.
So each worker asks Linux to SIGKILL it when its parent dies (`prctl(PR_SET_PDEATHSIG)`), before
the script's first line runs, and then runs the script as `python script.py` would.

Linux only: on other systems this does nothing, and a worker outlives a SIGKILLed launcher until
its next collective fails (after `timeout`). A launcher stopped by SIGTERM or Ctrl-C stops its
workers itself, everywhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import runpy
import signal
import sys
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_launcher(launcher_pid: int) -> None:
    """Have the kernel SIGKILL this process as soon as `launcher_pid`, its parent, dies.

    The signal fires when the parent *thread* that started this process exits: torch's agent
    starts the workers from the thread that called `elastic_launch`, which lives until the job
    ends. A launcher that died before this call is not seen by the kernel: the parent check
    after it catches that case. Does nothing outside Linux. Raises OSError if prctl fails.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL.value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(errno)}")
    if os.getppid() != launcher_pid:  # orphaned already: the kernel will not signal us now
        os.kill(os.getpid(), signal.SIGKILL)


class InWorker:
    """`fn(*args, **kwargs)`, called in a worker after `die_with_launcher`: `spawn.run`'s entry point.

    Picklable (the workers are fresh processes) and named after `fn`, so torch's reports say
    which function failed.
    """

    def __init__(self, fn: Callable[..., Any], launcher_pid: int, kwargs: dict[str, Any] | None = None):
        self.fn, self.launcher_pid, self.kwargs = fn, launcher_pid, kwargs or {}
        self.__name__ = self.__qualname__ = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, *args: Any) -> Any:
        die_with_launcher(self.launcher_pid)
        try:
            return self.fn(*args, **self.kwargs)
        except Exception as error:
            # A victim of another rank's failure waits to be stopped, so that the launcher
            # reports the rank that failed first (and its traceback), never this one.
            from trainloop.topology import stand_aside_if_a_peer_failed

            stand_aside_if_a_peer_failed(error, os.environ.get("RANK", "?"))
            raise


def main(argv: Sequence[str]) -> None:
    """Run `argv` (LAUNCHER_PID, then a script or `-m module`, then its arguments) as python would.

    An exception from the script is shown as python would show it, from the script's first
    frame (this module's and runpy's frames above it say nothing to the user); a script that
    ends well without ever joining the job leaves a note for the launcher (`never_joined`).
    """
    launcher_pid, *command = argv
    die_with_launcher(int(launcher_pid))
    try:
        _run_as_python_would(command)
    except SystemExit as stop:
        if stop.code in (None, 0):
            _note_if_never_joined()
        raise
    except Exception as error:
        # Python prints an exception's own __traceback__, whatever traceback the hook is given.
        trimmed = _from_the_script(error.__traceback__)
        sys.excepthook(type(error), error.with_traceback(trimmed), trimmed)
        sys.exit(1)
    _note_if_never_joined()


def _run_as_python_would(command: Sequence[str]) -> None:
    if command[0] == "-m":
        sys.argv = list(command[1:])  # run_module puts the module's file in argv[0], as `python -m` does
        runpy.run_module(command[1], run_name="__main__", alter_sys=True)
    else:
        # As `python script.py` has it: argv[0] as given, the script's (real) directory first on
        # the path instead of the current one, `__file__` absolute.
        sys.argv = list(command)
        sys.path[0] = os.path.dirname(os.path.realpath(command[0]))
        runpy.run_path(os.path.abspath(command[0]), run_name="__main__")


_LAUNCH_FILES = {os.path.abspath(__file__), os.path.abspath(runpy.__file__), "<frozen runpy>"}


def _from_the_script(traceback: TracebackType | None) -> TracebackType | None:
    """`traceback` without its first frames that belong to this module or runpy."""
    while (traceback is not None and traceback.tb_next is not None
           and traceback.tb_frame.f_code.co_filename in _LAUNCH_FILES):
        traceback = traceback.tb_next
    return traceback


# Where the launcher's job directory is (not a TRAINLOOP_* name: those are run settings), and
# the name of the note a worker leaves there when its script never joined the job.
JOB_DIR_VARIABLE = "_TRAINLOOP_JOB_DIR"
NEVER_JOINED_PREFIX = "never-joined-"


def _note_if_never_joined() -> None:
    """In a job of many ranks, note for the launcher that this script ran without joining it.

    Joined means `tl.init` joined (or found) a process group, or one is still joined now (a
    script on torch.distributed alone). The note names the attempt, so the launcher reads
    only the last attempt's notes after restarts.
    """
    job_dir = os.environ.get(JOB_DIR_VARIABLE)
    if not job_dir or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return
    topology = sys.modules.get("trainloop.topology")
    if topology is not None and topology.has_joined():
        return
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        return
    attempt, rank = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"), os.environ.get("RANK", "0")
    with contextlib.suppress(OSError):  # a note lost is a warning lost, never a failed job
        open(os.path.join(job_dir, f"{NEVER_JOINED_PREFIX}{attempt}-{rank}"), "w").close()


if __name__ == "__main__":
    main(sys.argv[1:])
