"""The suite's tiers, and the environment every test starts from.

Tiers: `slow` (starts a process or takes more than ~2 s) and `bench` (a benchmark's smoke test);
`python3 bootstrap.py test --fast` runs `-m "not slow and not bench"`. A test is marked by its
folder (tests/multiprocess and tests/spawn are slow, tests/benchmarks is bench), by the
`multiprocess` marker (which implies slow), or by `@pytest.mark.slow` itself. The fast tier's
promise, no process start-ups, is checked: a test outside `slow` and `bench` whose run reaps a
child process fails, naming the marker to add.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
SLOW_FOLDERS = ("multiprocess", "spawn")
BENCH_FOLDERS = ("benchmarks",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(item.path)
        folder = path.relative_to(TESTS).parts[0] if path.is_relative_to(TESTS) else ""
        if folder in BENCH_FOLDERS:
            item.add_marker(pytest.mark.bench)
        if folder in SLOW_FOLDERS or item.get_closest_marker("multiprocess"):
            item.add_marker(pytest.mark.slow)


def _children_cpu_seconds() -> float:
    """CPU time of this process's children that have ended and been waited for (grows by at least
    an interpreter's start-up, tens of milliseconds, with every Python child)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


CHILDREN_BEFORE = pytest.StashKey[float]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[CHILDREN_BEFORE] = _children_cpu_seconds()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A fast-tier test that started a process fails at teardown: the fast tier has no start-ups."""
    outcome = yield
    report = outcome.get_result()
    if call.when != "teardown" or not report.passed or CHILDREN_BEFORE not in item.stash:
        return
    started = _children_cpu_seconds() - item.stash[CHILDREN_BEFORE]
    if started > 0 and not (item.get_closest_marker("slow") or item.get_closest_marker("bench")):
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} started a child process ({started:.2f} s of its CPU) but is not marked "
            "slow: mark it `@pytest.mark.slow` (or `multiprocess`), or move it to tests/multiprocess/, "
            "so that `bootstrap.py test --fast` stays free of process start-ups")


@pytest.fixture(autouse=True)
def _no_trainloop_environment(monkeypatch):
    """Tests start without spawn's settings, whatever the shell that runs them has set."""
    for name in list(os.environ):
        if name.startswith("TRAINLOOP_"):
            monkeypatch.delenv(name)
