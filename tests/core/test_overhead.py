"""The hot path's cost, counted rather than timed (a count does not depend on the machine's load):
Python calls per step, tensor ops per report, and the guards that stay on while it is cheap.
"""

from __future__ import annotations

import collections
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import trainloop as tl
from tests.support.reference import mse, regression_data, tiny_model
from trainloop.callbacks import Callback

TRAINLOOP_DIR = os.path.dirname(tl.__file__)


class Reports(Callback):
    def __init__(self):
        self.reports = []

    def on_log(self, state, metrics):
        self.reports.append((state.step, metrics))


class AtenOps(TorchDispatchMode):
    """Counts the tensor operations that reach the dispatcher inside the `with` block."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def python_calls(function) -> collections.Counter:
    """The Python functions `function()` calls, by (file, name), counted with sys.setprofile."""
    calls: collections.Counter = collections.Counter()

    def profile(frame, event, arg):
        if event == "call":
            calls[(frame.f_code.co_filename, frame.f_code.co_name)] += 1

    sys.setprofile(profile)
    try:
        function()
    finally:
        sys.setprofile(None)
    return calls


def test_a_training_step_costs_a_handful_of_trainloop_python_calls():
    # The README loop at accumulate=1: accumulate, backward, step, log, and the three new states
    # (`advance`), the optimizer's step pre-hook: 8 calls, and no context-manager frames. Before
    # the hot path was trimmed it was ~18.6 (evolve/_copy_with layers, world_size, registered,
    # zero_grad, report_due, contextlib.nullcontext's __enter__/__exit__).
    model = tiny_model()
    state, model, optimizer = tl.prepare(tl.init(), model, torch.optim.SGD(model.parameters(), lr=0.01))
    x, y = regression_data(4).tensors
    steps = 50

    def loop():
        nonlocal state
        for _ in range(steps):
            with tl.accumulate(state, model):
                loss = mse(model, x, y)
                state = tl.backward(state, loss)
            state = tl.step(state, optimizer)
            state = tl.log(state, loss=loss)

    loop()  # warm
    calls = python_calls(loop)
    ours = {key: n for key, n in calls.items()
            if key[0].startswith(TRAINLOOP_DIR) or key[0].endswith("contextlib.py")}
    per_step = sum(ours.values()) / steps
    assert per_step <= 8.5, sorted(ours.items(), key=lambda kv: -kv[1])
    assert state.step == 2 * steps
    tl.finish(state)


def test_the_loop_without_trackers_runs_no_tensor_op_but_the_logged_losss_detach():
    def raw_ops():
        torch.manual_seed(0)
        model = tiny_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        with AtenOps() as counted:
            for _ in range(20):
                mse(model, x, y).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return counted.ops, model

    x, y = regression_data(4).tensors
    reference, raw_model = raw_ops()
    torch.manual_seed(0)
    model = tiny_model()
    state, model, optimizer = tl.prepare(tl.init(log_every=5), model, torch.optim.SGD(model.parameters(), lr=0.01))
    with AtenOps() as counted:
        for _ in range(20):
            with tl.accumulate(state, model):
                loss = mse(model, x, y)
                state = tl.backward(state, loss)
            state = tl.step(state, optimizer)
            state = tl.log(state, loss=loss)
    extra = counted.ops.copy()
    extra.subtract(reference)
    assert {op: n for op, n in extra.items() if n} == {"aten.detach.default": 20}
    for ours, theirs in zip(model.parameters(), raw_model.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    tl.finish(state)


def test_a_report_to_a_tracker_is_one_stack_and_one_sum_and_the_plain_means():
    reports = Reports()
    model = tiny_model()
    state = tl.init(log_every=10, callbacks=[reports])
    state, model, optimizer = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.0))
    x, y = regression_data(4).tensors
    logged = collections.defaultdict(list)
    for i in range(10):
        state = tl.step(tl.backward(state, mse(model, x, y)), optimizer)
        values = {"loss": torch.tensor(0.5 * i), "accuracy": torch.tensor(i / 7.0),
                  "norm": torch.tensor(float(i * i))}
        for name, value in values.items():
            logged[name].append(float(value))
        if i < 9:
            state = tl.log(state, **values)
    with AtenOps() as counted:  # the reporting call: 3 names x 10 values
        state = tl.log(state, **values)
    ops = counted.ops
    assert ops["aten.stack.default"] == 1 and ops["aten.sum.dim_IntList"] == 1, ops
    assert sum(ops.values()) <= 3 + 3, ops  # + the three detaches of this call's values
    [(step, metrics)] = reports.reports
    assert step == 10
    for name, values in logged.items():
        assert metrics[name] == pytest.approx(sum(values) / len(values), rel=1e-6)
    tl.finish(state)


def test_a_report_of_uneven_names_numbers_and_dtypes_is_the_plain_means():
    # The general path: a name missing from some calls, a plain number, a float64 and an int tensor.
    reports = Reports()
    model = tiny_model()
    state = tl.init(log_every=4, callbacks=[reports])
    state, model, optimizer = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.0))
    x, y = regression_data(4).tensors
    calls = [{"a": torch.tensor(1.0), "b": 2},
             {"a": torch.tensor(3.0, dtype=torch.float64)},
             {"a": torch.tensor(5), "b": torch.tensor([4.0])},
             {"a": torch.tensor(7.0), "b": 6.0, "c": torch.tensor(1.5, dtype=torch.float64)}]
    for values in calls:
        state = tl.step(tl.backward(state, mse(model, x, y)), optimizer)
        state = tl.log(state, **values)
    tl.finish(state)
    assert reports.reports == [(4, {"a": 4.0, "b": 4.0, "c": 1.5})]


def test_one_runs_step_never_lets_another_runs_optimizer_step_by_hand():
    # While tl.step steps run A's optimizer, run B's optimizer stepped by hand (here from a
    # step pre-hook of A's) is still refused: the permission is run A's, not the process's.
    model_a, model_b = tiny_model(), tiny_model()
    state_a, model_a, opt_a = tl.prepare(tl.init(), model_a, torch.optim.SGD(model_a.parameters(), lr=0.1))
    state_b, model_b, opt_b = tl.prepare(tl.init(), model_b, torch.optim.SGD(model_b.parameters(), lr=0.1))
    x, y = regression_data(4).tensors
    state_b = tl.backward(state_b, mse(model_b, x, y))
    before = [p.detach().clone() for p in model_b.parameters()]
    opt_a.register_step_pre_hook(lambda opt, args, kwargs: opt_b.step())
    with pytest.raises(RuntimeError, match=r"optimizer\.step\(\) was called on it directly"):
        tl.step(tl.backward(state_a, mse(model_a, x, y)), opt_a)
    assert all(torch.equal(p, b) for p, b in zip(model_b.parameters(), before))
    state_b = tl.step(state_b, opt_b)  # B's own step is unaffected, and A's flag was reset
    assert state_b.step == 1
    with pytest.raises(RuntimeError, match=r"tl\.step"):
        opt_a.step()
    tl.finish(state_b)
    tl.finish(state_a)
