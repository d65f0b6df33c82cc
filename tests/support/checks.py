"""Per-check outcomes for multi-process workers: one start-up runs many checks, each reported alone.

A worker started once by `spawn.run` runs every check of a module (start-ups are the suite's
cost), and returns its results to the test process. Without care, one check that raises ends
the worker and errors every test of the module with the same traceback. Here each check runs
under `results.check(name)`: an exception is caught and recorded on every rank, the worker goes
on with the next check, and the keys the failed check wrote (or never got to write) fail only
the tests that read them, each with the worker's traceback.

A worker that dies (a segfault, SIGKILL, a hang that times out) still fails the whole module:
its process is gone, and nothing it would have returned exists.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator
from typing import Any


class Failed:
    """What a key holds when the check that writes it raised: the check's name and tracebacks."""

    def __init__(self, check: str, report: str) -> None:
        self.check, self.report = check, report

    def __repr__(self) -> str:
        return f"Failed(check={self.check!r})"


class WorkerResults(dict):
    """A worker's results by key; reading a key of a failed check fails the reading test.

    In the worker: `results = WorkerResults()`, then `with results.check("gather"): ...` around
    each check. In the test: `results["key"]` as with a dict; a key whose check raised (on any
    rank) calls `pytest.fail` with that check's traceback, and a key no check wrote names the
    checks that failed, so the test's own failure says why.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failures: dict[str, str] = {}

    @contextlib.contextmanager
    def check(self, name: str) -> Iterator[WorkerResults]:
        """Run the block as the check `name`; an exception on any rank is recorded, not raised.

        Every rank's outcome is exchanged after the block (when a process group is up), so a
        check that raised on rank 1 fails on rank 0's results too. A rank that raised before a
        collective the other ranks entered leaves them waiting in it: the job's timeout ends that.
        """
        before = set(self)
        report = None
        try:
            yield self
        except Exception:
            report = traceback.format_exc()
        reports = _from_every_rank(report)
        failed = {rank: text for rank, text in enumerate(reports) if text}
        if not failed:
            return
        text = "\n".join(f"-- rank {rank} --\n{trace}" for rank, trace in failed.items())
        self.failures[name] = f"the check {name!r} raised in the worker on rank(s) {sorted(failed)}:\n{text}"
        for key in set(self) - before:
            dict.__setitem__(self, key, Failed(name, self.failures[name]))

    def __getitem__(self, key: Any) -> Any:
        value = super().__getitem__(key)
        if isinstance(value, Failed):
            _fail(f"{key!r} comes from a check that failed: {value.report}")
        return value

    def __missing__(self, key: Any) -> Any:
        if self.failures:
            _fail(f"no check wrote {key!r}; these failed in the worker:\n" + "\n".join(self.failures.values()))
        raise KeyError(key)

    def get(self, key: Any, default: Any = None) -> Any:
        return self[key] if key in self else default  # noqa: SIM401  (dict.get would skip the check)


def _fail(message: str) -> None:
    import pytest  # only in the test process: the workers never read their results

    pytest.fail(message, pytrace=False)


def _from_every_rank(report: str | None) -> list[str | None]:
    """Every rank's report, on every rank; only this rank's when no process group is up."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [report]
    reports: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    return reports
