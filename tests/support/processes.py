"""Running Python children from a test: the environment that finds tests.support, other users."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

from tests.support.paths import REPO


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment with the repository root first on PYTHONPATH, so that a
    `python -c` child imports `tests.support` (and this checkout's trainloop) from any directory."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


@functools.cache
def why_user_cannot_run_python(user: str) -> str | None:
    """None when `user` can run this interpreter and import trainloop and tests.support; else why not.

    A test that runs a child as another user (to see a permission error that root never gets)
    skips where that user cannot read the interpreter, the virtual environment or the checkout.
    """
    try:
        done = subprocess.run([sys.executable, "-c", "import trainloop, tests.support.checkpoints"],
                              capture_output=True, text=True, timeout=120, cwd="/", env=child_env(),
                              user=user, check=False)
    except (KeyError, OSError, subprocess.SubprocessError) as error:  # no such user, or no right to switch
        return f"cannot start a process as {user!r}: {error}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"the user {user!r} cannot run {sys.executable} with this checkout: {last}"
    return None
