"""One job of worker processes for many test modules: process start-ups are the suite's cost.

Each multi-process test module used to start its own `spawn.run(checks, n=2)`: on a 2-core
machine every start-up (torch imported in each worker, the rendezvous, the process group) costs
seconds, four ranks more. Here a module declares its worker call instead,

    CALL = shared_job.Call(ddp_checks, n=2, args=lambda directory: (str(directory),))

    @pytest.fixture(scope="module")
    def ddp(request):
        return CALL.result(request)

and the first module whose fixture asks starts one job of `n` ranks that runs, one after the
other in the same processes, the declared calls of every module of the session that has a test
selected. Each call's result (rank 0's, as `spawn.run` returns) goes to its own module; a call
that raised in the worker fails that module's tests only, with the worker's traceback.

What a call must allow: it runs after other modules' calls in the same processes, so it seeds
what it draws and finishes the runs it starts (as `runs_in_sequence` checks trainloop allows).
A worker that dies or hangs still ends the whole job: every module that shares it fails.
"""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

_DECLARED: list[Call] = []
_RESULTS: dict[int, Any] = {}  # by rank count: each call's result by its key, or _JobFailed


class _Raised:
    """What a call's key holds when the call raised in the worker: the traceback."""

    def __init__(self, report: str) -> None:
        self.report = report


class _JobFailed(_Raised):
    """What the shared job's slot holds when the job itself failed: the launcher's traceback."""


class Call:
    """A worker call of one test module, run in the session's shared job of `n` ranks.

    Args:
        target: a module-level function of the workers, or its name as "package.module:function"
            (declaring it by name imports nothing).
        n: the ranks of the job it runs in (2 or 4).
        args: a function of a fresh temporary directory that returns the call's arguments; it
            runs in the test process, just before the job starts (write input files there).
    """

    def __init__(self, target: Callable[..., Any] | str, *, n: int = 2,
                 args: Callable[[Path], tuple] | None = None) -> None:
        import inspect

        if not isinstance(target, str):
            target = f"{target.__module__}:{target.__qualname__}"
        self.target, self.n, self.args = target, n, args
        self.module = inspect.stack()[1].frame.f_globals["__name__"]  # the declaring test module
        self.key = f"{self.module}/{target}"
        self.directory: Path | None = None
        _DECLARED.append(self)

    def result(self, request: Any) -> Any:
        """This call's result (rank 0's); starts the shared job on the first request."""
        import pytest

        if self.n not in _RESULTS:
            try:
                _RESULTS[self.n] = _run_job(self.n, request)
            except Exception:  # the job itself failed (a worker died): once, not once per module
                _RESULTS[self.n] = _JobFailed(traceback.format_exc())
        job = _RESULTS[self.n]
        if isinstance(job, _JobFailed):
            pytest.fail(f"the shared {self.n}-rank job failed, so {self.target} has no result:\n{job.report}",
                        pytrace=False)
        found = job[self.key]
        if isinstance(found, _Raised):
            pytest.fail(f"{self.target} raised in the worker:\n{found.report}", pytrace=False)
        return found


def _run_job(n: int, request: Any) -> dict[str, Any]:
    from trainloop import spawn

    selected = {item.module.__name__ for item in request.session.items if getattr(item, "module", None)}
    calls = [call for call in _DECLARED if call.n == n and (call.module in selected or call.module == request.module.__name__)]
    factory = request.getfixturevalue("tmp_path_factory")
    planned = []
    for call in calls:
        call.directory = factory.mktemp(call.target.rsplit(":", 1)[1])
        planned.append((call.key, call.target, call.args(call.directory) if call.args else ()))
    return spawn.run(run_calls, planned, n=n)


def run_calls(planned: list[tuple[str, str, tuple]]) -> dict[str, Any]:
    """In the workers: every planned call in turn; its result, or its traceback, by its key."""
    results: dict[str, Any] = {}
    for key, target, args in planned:
        module, name = target.split(":")
        try:
            results[key] = getattr(importlib.import_module(module), name)(*args)
        except Exception:
            results[key] = _Raised(traceback.format_exc())
    return results
