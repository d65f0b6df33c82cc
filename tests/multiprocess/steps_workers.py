"""Checks of `tl.log`'s cross-rank reports that run inside 2 worker processes (gloo, CPU).

`log_checks` is started once by `trainloop.spawn.run(fn, n=2)`; it returns plain data from
every rank (gathered to rank 0), and tests/multiprocess/test_steps_multiprocess.py asserts on it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import trainloop as tl
from tests.support.reference import mse, tiny_model
from trainloop.callbacks import Callback


class _Reports(Callback):
    def __init__(self):
        self.reports = []

    def on_log(self, state, metrics):
        self.reports.append((state.step, metrics))


class _CountCollectives:
    """Counts the collectives torch.distributed runs while active (the real ones still run)."""

    NAMES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list")

    def __enter__(self):
        self.calls = []
        self._originals = {name: getattr(dist, name) for name in self.NAMES}
        for name, original in self._originals.items():
            def counted(*args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(*args, **kwargs)
            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(dist, name, original)


def _everyone(value):
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def log_checks() -> dict:
    reports = _Reports()
    # A short timeout: a report that hangs fails the job within seconds instead of never.
    state = tl.init(log_every=1, callbacks=[reports], timeout=30)
    model = tiny_model()
    state, model, optimizer = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.0))
    x, y = torch.randn(4, 6), torch.randn(4, 3)
    rank = state.rank
    results: dict = {}

    def step(state):
        return tl.step(tl.backward(state, mse(model, x, y)), optimizer)

    def report(state, *logs):
        """One step, then each of this rank's `logs` (dicts); the last one reports."""
        state = step(state)
        for values in logs[:-1]:
            state = state.evolve(pending_logs=(values, state.pending_logs))
        try:
            return tl.log(state, **logs[-1]), None
        except ValueError as error:
            return state.evolve(pending_logs=None), str(error)

    # The first report agrees on the names; the next with the same names is one all-reduce.
    state, error = report(state, {"loss": float(rank + 1)})
    results["first"] = (reports.reports[-1:] if rank == 0 else None, error)
    with _CountCollectives() as counted:
        state, error = report(state, {"loss": torch.tensor(float(rank + 3))})
    results["agreed"] = (reports.reports[-1:] if rank == 0 else None, error, _everyone(counted.calls))
    # The same names, logged a different number of times: the mean over all the values.
    logs = ({"loss": 1.0}, {"loss": 3.0}) if rank == 0 else ({"loss": 2.0},)
    state, error = report(state, *logs)
    results["counts_differ"] = (reports.reports[-1:] if rank == 0 else None, error)
    # Different names, as many of them: an error on every rank, nothing reported.
    before = len(reports.reports)
    state, error = report(state, {"a": 1.0} if rank == 0 else {"b": 100.0})
    results["names_differ"] = (reports.reports[before:] if rank == 0 else None, _everyone(error))
    # Different numbers of names: the same error, not a hang.
    state, error = report(state, {"a": 1.0} if rank == 0 else {"a": 1.0, "b": 2.0})
    results["name_counts_differ"] = (reports.reports[before:] if rank == 0 else None, _everyone(error))
    # Agreed again, then one rank alone adds a name: caught inside the agreed report's collective.
    state, error = report(state, {"loss": 1.0})
    state, error2 = report(state, {"loss": 1.0} if rank == 0 else {"loss": 1.0, "extra": 5.0})
    results["one_rank_adds_a_name"] = (error, _everyone(error2))
    # Every rank changes its names alike: reported.
    state, error = report(state, {"loss": 1.0, "val_acc": float(rank)})
    results["all_change_alike"] = (reports.reports[-1:] if rank == 0 else None, error)
    # Values logged after the last step's report reach the trackers at finish.
    state = tl.log(state, final=float(rank))
    # A second run, whose rank 0 alone logs after the last report: finish raises, never hangs.
    second = tl.init(log_every=1)
    second, second_model, second_optimizer = tl.prepare(
        second, tiny_model(), torch.optim.SGD(tiny_model().parameters(), lr=0.0))
    second = tl.log(tl.step(tl.backward(second, mse(second_model, x, y)), second_optimizer), loss=1.0)
    if rank == 0:
        second = tl.log(second, val_acc=0.5)
    try:
        tl.finish(second)
        results["finish_one_rank_logs"] = _everyone(None)
    except ValueError as error:
        results["finish_one_rank_logs"] = _everyone(str(error))
    # A third, that reported and then logged nothing more: finish reports nothing, raises nothing.
    third_reports = _Reports()
    third = tl.init(log_every=1, callbacks=[third_reports])
    third, third_model, third_optimizer = tl.prepare(
        third, tiny_model(), torch.optim.SGD(tiny_model().parameters(), lr=0.0))
    third = tl.log(tl.step(tl.backward(third, mse(third_model, x, y)), third_optimizer), loss=float(rank))
    tl.finish(third)
    results["finish_nothing_pending"] = third_reports.reports if rank == 0 else None
    tl.finish(state)
    results["finish"] = reports.reports[-1:] if rank == 0 else None
    return results
