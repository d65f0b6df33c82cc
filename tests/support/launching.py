"""Launching `python -m trainloop.spawn` jobs from a test and watching their processes.

Shared by tests/spawn/test_spawn.py and tests/spawn/test_multinode.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.support.paths import SCRIPTS  # noqa: F401  (the scripts these helpers launch)
from tests.support.reference import big_batch_reference, regression_data, tiny_model


def launch(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainloop.spawn", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def reference_weights() -> dict:
    model = tiny_model()
    big_batch_reference(model, torch.optim.AdamW(model.parameters(), lr=1e-2), regression_data(40),
                        big_batch=8, epochs=2, seed=3, shuffle=True)
    return model.state_dict()


def assert_reference(saved: dict) -> None:
    for name, value in reference_weights().items():
        torch.testing.assert_close(saved["weights"][name], value, atol=1e-6, rtol=0)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead but not yet reaped by its (dead) parent.
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


def write_pid_and_wait(directory: str) -> None:
    """A `spawn.run` worker: writes its pid to directory/<rank>.pid, then waits to be stopped."""
    with open(os.path.join(directory, f"{os.environ['RANK']}.pid"), "w") as file:
        file.write(str(os.getpid()))
    while True:
        time.sleep(0.1)


def wait_for_pids(directory: Path, count: int, jobs: list[subprocess.Popen]) -> list[int]:
    deadline = time.monotonic() + 90
    while len(list(directory.glob("*.pid"))) < count:
        for job in jobs:
            assert job.poll() is None, job.communicate()[0]
        assert time.monotonic() < deadline, "the workers never started"
        time.sleep(0.1)
    time.sleep(0.2)  # the pid files are complete
    return [int(p.read_text()) for p in directory.glob("*.pid")]
