"""Bad input raises an error that names the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

import trainloop as tl
from tests.support.reference import mse, regression_data, tiny_model
from trainloop.config import SETTINGS, Config


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("accumulate", 0, r"accumulate must be a number >= 1 \(got 0\)"),
        ("accumulate", 2.5, r"accumulate must be an integer"),
        ("precision", "fp9", r"precision must be one of 'fp32', 'bf16', 'fp16', 'bf16-true', 'fp16-true', 'fp64-true', 'fp8' \(got 'fp9'\)"),
        ("strategy", "zero3", r"strategy must be one of 'auto', 'ddp', 'fsdp' \(got 'zero3'\)"),
        ("log_every", 0, r"log_every must be a number >= 1"),
        ("seed", -1, r"seed must be a number >= 0"),
        ("compile", "yes", r"compile must be True, False or 'blocks'"),
        ("device", "gpu7", r"device must be a device string"),
    ],
)
def test_bad_settings_name_the_setting(setting, value, message):
    with pytest.raises(ValueError, match=message):
        tl.init(**{setting: value})


FLOAT_SETTINGS = [field.name for field in SETTINGS if isinstance(field.default, float)]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("setting", FLOAT_SETTINGS)
def test_every_float_setting_refuses_nan_and_inf(setting, value):
    with pytest.raises(ValueError, match=rf"^{setting} must be a (finite )?number"):
        Config(**{setting: value})
    with pytest.raises(ValueError, match=rf"^{setting} must be a (finite )?number"):
        tl.init(**{setting: value})


def test_float_settings_exist_for_the_check_above():
    assert "timeout" in FLOAT_SETTINGS


@pytest.mark.parametrize("value", ["abc", None, "600", True, [600]])
def test_timeout_that_is_not_a_number_names_timeout(value):
    with pytest.raises(ValueError, match=r"^timeout must be a number >= 1 \(got "):
        tl.init(timeout=value)
    assert tl.init(timeout=30).config.timeout == 30.0


@pytest.mark.parametrize("value", [2**63, 2**64, 2**100])
def test_seed_beyond_what_torch_accepts_names_seed(value):
    with pytest.raises(ValueError, match=r"^seed must be at most 2\*\*63 - 1"):
        tl.init(seed=value)
    largest = 2**63 - 1
    state, loader = tl.prepare(tl.init(seed=largest), DataLoader(regression_data(4), batch_size=2, shuffle=True))
    assert state.config.seed == largest and len([batch for _epoch in range(2) for batch in loader]) == 4


def test_environment_nan_names_the_variable(monkeypatch):
    monkeypatch.setenv("TRAINLOOP_TIMEOUT", "nan")
    with pytest.raises(ValueError, match=r"TRAINLOOP_TIMEOUT: timeout must be a finite number \(got nan\)"):
        tl.init()


def test_unknown_setting_is_a_type_error():
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['acumulate'\]"):
        tl.init(acumulate=2)


def test_environment_overrides_the_default_and_bad_values_name_the_variable(monkeypatch):
    monkeypatch.setenv("TRAINLOOP_ACCUMULATE", "4")
    monkeypatch.setenv("TRAINLOOP_PRECISION", "bf16")
    state = tl.init()
    assert state.config.accumulate == 4 and state.config.precision == "bf16"
    with pytest.warns(UserWarning, match=r"TRAINLOOP_ACCUMULATE=4 overrides init\(accumulate=2\)"):
        assert tl.init(accumulate=2).config.accumulate == 4
    monkeypatch.setenv("TRAINLOOP_PRECISION", "fp9")
    with pytest.raises(ValueError, match=r"TRAINLOOP_PRECISION: precision must be one of"):
        tl.init()
    monkeypatch.setenv("TRAINLOOP_PRECISION", "fp32")
    monkeypatch.setenv("TRAINLOOP_ACCUMULATE", "four")
    with pytest.raises(ValueError, match=r"TRAINLOOP_ACCUMULATE: accumulate must be an integer \(got 'four'\)"):
        tl.init()
    monkeypatch.delenv("TRAINLOOP_ACCUMULATE")
    monkeypatch.setenv("TRAINLOOP_PRECISON", "bf16")
    with pytest.raises(ValueError, match=r"unknown environment variable TRAINLOOP_PRECISON"):
        tl.init()


def test_step_before_prepare():
    with pytest.raises(ValueError, match=r"call tl.prepare\(state, model, optimizer\) first"):
        tl.step(tl.init())


def test_step_with_an_optimizer_that_was_not_prepared():
    model = tiny_model()
    state, model, _ = tl.prepare(tl.init(), model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = regression_data(2).tensors
    state = tl.backward(state, mse(model, x, y))
    with pytest.raises(ValueError, match="was not prepared"):
        tl.step(state, torch.optim.SGD(model.parameters(), lr=0.1))


def test_backward_of_a_non_scalar_or_a_tensor_without_grad():
    model = tiny_model()
    state = tl.init()
    x, y = regression_data(2).tensors
    with pytest.raises(ValueError, match=r"scalar loss tensor \(got \(2, 3\)\).*\.mean\(\)"):
        tl.backward(state, model(x) - y)
    with pytest.raises(ValueError, match="does not require grad.*no_grad"), torch.no_grad():
        tl.backward(state, mse(model, x, y))
    with pytest.raises(ValueError, match="scalar loss tensor"):
        tl.backward(state, 1.0)


def test_num_items_on_some_micro_steps_only():
    model = tiny_model()
    state = tl.init(accumulate=3)
    x, y = regression_data(2).tensors
    state = tl.backward(state, mse(model, x, y), num_items=2)
    with pytest.raises(ValueError, match="num_items was given on some micro-steps"):
        tl.backward(state, mse(model, x, y))
    other = tl.backward(tl.init(accumulate=3), mse(model, x, y))
    with pytest.raises(ValueError, match="num_items was given on some micro-steps"):
        tl.backward(other, mse(model, x, y), num_items=2)


def test_prepare_rejects_unsupported_and_repeated_objects():
    with pytest.raises(TypeError, match=r"cannot prepare a str; it supports nn.Module"):
        tl.prepare(tl.init(), "model.pt")
    model = tiny_model()
    state, model = tl.prepare(tl.init(), model)
    with pytest.raises(ValueError, match="already prepared"):
        tl.prepare(state, model)
    loader = DataLoader(regression_data(4), batch_size=2)
    state, loader = tl.prepare(state, loader)
    with pytest.raises(ValueError, match="already prepared"):
        tl.prepare(state, loader)


def test_scheduler_of_an_unprepared_optimizer():
    model = tiny_model()
    sched = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(model.parameters(), lr=0.1), 1)
    with pytest.raises(ValueError, match="pass its optimizer to prepare too"):
        tl.prepare(tl.init(), model, sched)


def test_log_rejects_non_scalars():
    with pytest.raises(ValueError, match=r"log: loss must be a scalar \(got a tensor of shape \(3,\)\)"):
        tl.log(tl.init(), loss=torch.ones(3))
    with pytest.raises(TypeError, match="log: name must be a number"):
        tl.log(tl.init(), name="x")


def test_callbacks_must_be_callbacks():
    with pytest.raises(TypeError, match="must be trainloop.callbacks.Callback instances"):
        tl.init(callbacks=[print])


def test_half_precision_model_with_autocast_policy():
    with pytest.raises(ValueError, match="expects fp32 parameters.*bf16-true"):
        tl.prepare(tl.init(precision="fp16"), tiny_model().half())
