"""The single-process training loop, checked against plain PyTorch."""

from __future__ import annotations

import json

import attrs
import pytest
import torch
from torch.utils.data import DataLoader

import trainloop as tl
from tests.support.reference import (
    TokenData,
    big_batch_reference,
    mse,
    regression_data,
    tiny_model,
    token_loss_sum,
)
from trainloop.callbacks import Callback


def train(state, model, optimizer, loader, epochs, *, loss="mse", scheduler=None):
    objects = (model, optimizer, loader) + ((scheduler,) if scheduler is not None else ())
    state, model, optimizer, loader, *_ = tl.prepare(state, *objects)
    for _epoch in range(loader.epoch, epochs):
        for batch in loader:
            with tl.accumulate(state, model):
                if loss == "mse":
                    state = tl.backward(state, mse(model, *batch))
                else:
                    x, y, mask = batch
                    state = tl.backward(state, token_loss_sum(model, x, y, mask), num_items=mask.sum())
            state = tl.step(state, optimizer)
    return state


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float = 1e-6) -> None:
    for (name, p), q in zip(tl.unwrap(a).named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=0, msg=f"parameter {name} differs")


@pytest.mark.parametrize("n_samples", [64, 40])  # 40: windows of 4, 4 and a short 2
def test_accumulate_equals_one_big_batch(n_samples):
    data = regression_data(n_samples)
    ours, reference = tiny_model(), tiny_model()
    state = tl.init(accumulate=4, seed=3)
    loader = DataLoader(data, batch_size=4, shuffle=True)
    state = train(state, ours, torch.optim.AdamW(ours.parameters(), lr=1e-2), loader, epochs=2)
    big_batch_reference(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2), data,
                        big_batch=16, epochs=2, seed=3, shuffle=True)
    windows_per_epoch = -(-n_samples // 16)
    assert state.step == 2 * windows_per_epoch
    assert state.micro_step == 2 * n_samples // 4
    assert_same_weights(ours, reference)


def test_window_closes_at_epoch_end_without_leaking_into_next_epoch():
    data = regression_data(24)  # 6 batches of 4, accumulate 4: windows 4 + 2 per epoch
    state = tl.init(accumulate=4)
    model = tiny_model()
    state = train(state, model, torch.optim.SGD(model.parameters(), lr=0.1),
                  DataLoader(data, batch_size=4), epochs=3)
    assert state.step == 6 and state.window_micro_steps == 0


def test_ragged_num_items_equals_token_weighted_big_batch():
    data = TokenData(36)
    ours, reference = tiny_model(), tiny_model()
    state = tl.init(accumulate=3, seed=5)
    state = train(state, ours, torch.optim.SGD(ours.parameters(), lr=0.05),
                  DataLoader(data, batch_size=4, shuffle=True), epochs=2, loss="tokens")
    big_batch_reference(reference, torch.optim.SGD(reference.parameters(), lr=0.05), data,
                        big_batch=12, epochs=2, seed=5, shuffle=True, loss="tokens")
    assert_same_weights(ours, reference)


def test_accumulate_one_leaves_gradients_untouched():
    model = tiny_model()
    state = tl.init()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    state, model, optimizer = tl.prepare(state, model, optimizer)
    x, y = regression_data(4).tensors
    state = tl.backward(state, mse(model, x, y))
    expected = [p.grad.clone() for p in model.parameters()]
    seen = []

    class Spy(Callback):
        def on_before_step(self, state):
            seen.extend(p.grad.clone() for p in model.parameters())

    state = tl.step(tl.attach(state, Spy()), optimizer)
    for a, b in zip(seen, expected):
        assert torch.equal(a, b)


def test_scheduler_steps_once_per_optimizer_step():
    data = regression_data(40)
    ours, reference = tiny_model(), tiny_model()
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    state = train(tl.init(accumulate=4), ours, opt, DataLoader(data, batch_size=4), epochs=2,
                  scheduler=sched)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    big_batch_reference(reference, ref_opt, data, big_batch=16, epochs=2, seed=0, shuffle=False,
                        scheduler=ref_sched)
    assert state.step == 6 and sched.last_epoch == 6
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] == 0.1 * 0.5**3
    assert_same_weights(ours, reference)


def test_step_off_window_returns_the_same_state():
    model = tiny_model()
    state, model, opt = tl.prepare(tl.init(accumulate=2), model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = regression_data(4).tensors
    state = tl.backward(state, mse(model, x, y))
    assert tl.step(state, opt) is state


def test_two_states_coexist_in_one_process():
    a = tl.init(accumulate=2, seed=1)
    b = tl.init(accumulate=1, seed=2, precision="bf16")
    model_a, model_b = tiny_model(), tiny_model()
    a, model_a, opt_a = tl.prepare(a, model_a, torch.optim.SGD(model_a.parameters(), lr=0.1))
    b, model_b, opt_b = tl.prepare(b, model_b, torch.optim.SGD(model_b.parameters(), lr=0.1))
    x, y = regression_data(4).tensors
    for _ in range(4):
        a = tl.step(tl.backward(a, mse(model_a, x, y)), opt_a)
        b = tl.step(tl.backward(b, mse(model_b, x, y)), opt_b)
    assert (a.step, b.step) == (2, 4)
    assert a.optimizers == (opt_a,) and b.optimizers == (opt_b,)
    assert a.config.precision == "fp32" and b.config.precision == "bf16"


def test_state_is_immutable_and_readable():
    state = tl.init(accumulate=4, log_every=5)
    with pytest.raises(AttributeError):
        state.step = 3
    moved = state.evolve(step=3)
    assert state.step == 0 and moved.step == 3
    assert "step=0" in repr(state) and "accumulate=4" in repr(state)
    record = json.loads(json.dumps(state.to_dict()))
    assert record["accumulate"] == 4 and record["device"] == "cpu" and record["world_size"] == 1
    assert state.is_main and state.is_local_main and state.rank == 0 and state.world_size == 1


def test_evolve_copies_every_field():
    fields = attrs.fields(tl.RunState)
    # Any value in every field, except the lineage that evolve keeps the newest state in.
    from trainloop.state import Lineage

    original = tl.RunState(**{field.name: object() for field in fields if field.name != "lineage"}, lineage=Lineage())
    copy = original.evolve()
    assert copy is not original
    for field in fields:
        assert getattr(copy, field.name) is getattr(original, field.name), field.name
    assert original.evolve(step=7).step == 7
    with pytest.raises(TypeError, match="no field 'stepp'"):
        original.evolve(stepp=7)


def test_log_reports_means_every_log_every_steps_without_reading_tensors_early():
    reports = []

    class Recorder(Callback):
        def on_log(self, state, metrics):
            reports.append((state.step, metrics))

    model = tiny_model()
    state = tl.init(log_every=2, callbacks=[Recorder()])
    state, model, opt = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.0))
    x, y = regression_data(4).tensors
    for i in range(5):
        state = tl.step(tl.backward(state, mse(model, x, y)), opt)
        state = tl.log(state, value=torch.tensor(float(i)), constant=1)
    tl.finish(state)
    assert reports == [(2, {"constant": 1.0, "value": 0.5}),
                       (4, {"constant": 1.0, "value": 2.5}),
                       (5, {"constant": 1.0, "value": 4.0})]


def test_a_report_with_no_on_log_hook_drops_the_buffer_and_a_later_tracker_gets_only_new_values():
    reports = []

    class Recorder(Callback):
        def on_log(self, state, metrics):
            reports.append((state.step, metrics))

    model = tiny_model()
    state = tl.init(log_every=2)
    state, model, opt = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.0))
    x, y = regression_data(4).tensors
    for i in range(3):
        state = tl.step(tl.backward(state, mse(model, x, y)), opt)
        state = tl.log(state, value=torch.tensor(float(i)))
        if i == 1:  # the report at step 2, with no one to receive it: buffer dropped, step noted
            assert state.pending_logs is None and state.logged_step == 2
    state = tl.attach(state, Recorder())
    state = tl.step(tl.backward(state, mse(model, x, y)), opt)
    state = tl.log(state, value=torch.tensor(10.0))
    tl.finish(state)
    assert reports == [(4, {"value": 6.0})]  # the mean of 2 and 10: the values since step 2


def test_hooks_fire_in_order_and_only_when_overridden():
    calls = []

    class First(Callback):
        def on_step(self, state):
            calls.append(("first", state.step))

    class Second(Callback):
        def on_step(self, state):
            calls.append(("second", state.step))

        def on_backward(self, state, loss):
            calls.append(("backward", state.micro_step))
            return loss

    model = tiny_model()
    state = tl.init(callbacks=[First(), Second()])
    assert len(state.hooks.on_step) == 2 and len(state.hooks.on_backward) == 1
    assert state.hooks.on_log == ()
    state, model, opt = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = regression_data(4).tensors
    state = tl.step(tl.backward(state, mse(model, x, y)), opt)
    assert calls == [("backward", 0), ("first", 1), ("second", 1)]


def test_prepare_returns_objects_in_the_order_given():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    loader = DataLoader(regression_data(8), batch_size=2)
    state, p_loader, p_sched, p_opt, p_model = tl.prepare(tl.init(), loader, sched, opt, model)
    assert isinstance(p_loader, tl.PreparedLoader) and p_sched is sched and p_opt is opt
    assert tl.unwrap(p_model) is model
    assert state.models == (p_model,) and state.loaders == (p_loader,)


def test_log_takes_scalars_of_shapes_0_and_1_under_one_name():
    reports = []

    class Recorder(Callback):
        def on_log(self, state, metrics):
            reports.append(metrics)

    model = tiny_model()
    state = tl.init(log_every=2, callbacks=[Recorder()])
    state, model, opt = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.0))
    x, y = regression_data(4).tensors
    for value in (torch.tensor(1.0), torch.tensor([3.0])):  # () and (1,): e.g. a sum over a dim
        state = tl.step(tl.backward(state, mse(model, x, y)), opt)
        state = tl.log(state, value=value)
    tl.finish(state)
    assert reports == [{"value": 2.0}]
