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

import ctypes
import os
import runpy
import signal
import sys
from collections.abc import Callable, Sequence
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
    """`fn`, called in a worker after `die_with_launcher`: the entry point of `spawn.run`.

    Picklable (the workers are fresh processes) and named after `fn`, so torch's reports say
    which function failed.
    """

    def __init__(self, fn: Callable[..., Any], launcher_pid: int):
        self.fn, self.launcher_pid = fn, launcher_pid
        self.__name__ = self.__qualname__ = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, *args: Any) -> Any:
        die_with_launcher(self.launcher_pid)
        return self.fn(*args)


# The script's globals once it has run. `python script.py` keeps its `__main__` alive until the
# interpreter exits; runpy would drop it at once, and with it a run the script left unfinished,
# which `trainloop.lifecycle` must still find at exit.
script_globals: dict[str, Any] = {}


def main(argv: Sequence[str]) -> None:
    """Run `argv` (LAUNCHER_PID, then a script or `-m module`, then its arguments) as python would."""
    launcher_pid, *command = argv
    die_with_launcher(int(launcher_pid))
    if command[0] == "-m":
        sys.argv = command[1:]  # run_module puts the module's file in argv[0], as `python -m` does
        script_globals.update(runpy.run_module(command[1], run_name="__main__", alter_sys=True))
    else:
        # As `python script.py` has it: argv[0] as given, the script's (real) directory first on
        # the path instead of the current one, `__file__` absolute.
        sys.argv = command
        sys.path[0] = os.path.dirname(os.path.realpath(command[0]))
        script_globals.update(runpy.run_path(os.path.abspath(command[0]), run_name="__main__"))


if __name__ == "__main__":
    main(sys.argv[1:])
