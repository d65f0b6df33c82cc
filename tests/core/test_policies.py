"""Precision policies and strategies are objects of their own: built from settings, used without a run.

A `Precision` is built once by `init` (`state.precision`) and does the whole of a precision's
work (cast, forward, FSDP's mixed precision, loss scaling); a strategy is built from a `Config`
and a `Topology` alone and wraps a model without a `RunState`.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trainloop as tl
from tests.support.reference import regression_data, tiny_model
from trainloop import precision, strategies
from trainloop.callbacks import LossScale
from trainloop.precision import Autocast, Precision


@pytest.mark.filterwarnings("ignore:precision=.fp8.:UserWarning")
@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16", "bf16-true", "fp8"])
def test_init_builds_the_policy_of_the_setting_once(name):
    state = tl.init(precision=name)
    assert state.precision is precision.policy(name) and state.precision.name == name
    assert tl.prepare(state, tiny_model())[0].precision is state.precision  # carried, not rebuilt
    assert any(isinstance(c, LossScale) for c in state.callbacks) == (name == "fp16")


def test_an_unknown_policy_name_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"precision must be one of 'fp32', 'bf16', 'fp16', 'bf16-true', 'fp16-true', 'fp64-true', 'fp8' \(got 'fp9'\)"):
        precision.policy("fp9")


def test_bf16_policy_forward_equals_plain_autocast():
    x = regression_data(4).tensors[0]
    model = tiny_model()
    wrapped = precision.policy("bf16").wrap(precision.policy("bf16").cast(model), torch.device("cpu"))
    assert isinstance(wrapped, Autocast) and tl.unwrap(wrapped) is model
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
    assert expected.dtype == torch.bfloat16
    out = wrapped(x)
    assert out.dtype == torch.float32 and torch.equal(out, expected.float())


def test_fp32_policy_leaves_the_model_as_it_is():
    model = tiny_model()
    policy = precision.policy("fp32")
    assert policy.wrap(policy.cast(model), torch.device("cpu")) is model


def test_bf16_true_policy_casts_parameters_and_inputs():
    x = regression_data(4).tensors[0]
    policy = precision.policy("bf16-true")
    model = policy.cast(tiny_model())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    expected = tiny_model().to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    assert torch.equal(policy.wrap(model, torch.device("cpu"))(x), expected)


def test_the_fsdp_mixed_precision_policy_of_each_precision():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    assert precision.policy("bf16").fsdp_policy() == MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                          reduce_dtype=torch.float32)
    assert precision.policy("fp16").fsdp_policy() == MixedPrecisionPolicy(param_dtype=torch.float16,
                                                                          reduce_dtype=torch.float32)
    assert precision.policy("fp8").fsdp_policy().param_dtype == torch.bfloat16
    for name in ("fp32", "bf16-true"):
        assert precision.policy(name).fsdp_policy() == MixedPrecisionPolicy()


def test_a_new_policy_is_one_object_with_fields():
    """What a `64-true` policy would be: float64 parameters, inputs cast, no autocast."""
    x = regression_data(4).tensors[0]
    policy = Precision("64-true", param_dtype=torch.float64)
    model = policy.wrap(policy.cast(tiny_model()), torch.device("cpu"))
    expected = tiny_model().double()(x.double())
    out = model(x)
    assert out.dtype == torch.float64 and torch.equal(out, expected)


# -- strategies built from a Config and a Topology alone ----------------------------------------


def test_a_local_strategy_wraps_a_model_without_a_run():
    model = tiny_model()
    strategy = strategies.create(tl.Config(), tl.Topology())
    assert strategy.name == "local" and strategy.data_parallel() == (0, 1)
    assert strategy.wrap(model) == (model, {})


def test_a_local_strategy_materialises_a_meta_model_from_the_configs_seed():
    with tl.empty_weights():
        model = nn.Linear(4, 3)
    wrapped, replaced = strategies.create(tl.Config(seed=5), tl.Topology()).wrap(model)
    torch.manual_seed(5)
    expected = nn.Linear(4, 3)
    assert not any(p.is_meta for p in wrapped.parameters()) and len(replaced) == 2
    assert torch.equal(wrapped.weight, expected.weight) and torch.equal(wrapped.bias, expected.bias)


def test_a_local_strategy_applies_activation_checkpointing_from_its_config():
    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layers = nn.ModuleList(nn.Linear(6, 6) for _ in range(2))

        def forward(self, x):
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return x

    x = regression_data(4).tensors[0]
    plain, checkpointed = Blocks(), Blocks()
    strategy = strategies.create(tl.Config(activation_checkpointing="blocks"), tl.Topology())
    strategy.wrap(checkpointed)
    assert "CheckpointWrapper" in {type(m).__name__ for m in checkpointed.modules()}
    plain(x).sum().backward()
    checkpointed(x).sum().backward()
    for a, b in zip(plain.parameters(), checkpointed.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_ddp_and_fsdp_strategies_are_built_and_checked_from_a_topology():
    two = tl.Topology(rank=1, world_size=2, local_world_size=2, local_rank=1, backend="gloo")
    ddp = strategies.create(tl.Config(), two)
    assert ddp.name == "ddp" and ddp.data_parallel() == (1, 2) and ddp.data_parallel_group() is None
    with pytest.raises(ValueError, match="ddp_comm_hook='bf16' needs the nccl or xccl backend"):
        strategies.create(tl.Config(ddp_comm_hook="bf16"), two)
    four = tl.Topology(rank=3, world_size=4, local_world_size=4, local_rank=3, backend="gloo")
    fsdp = strategies.create(tl.Config(strategy="fsdp", tp=2), four)
    assert fsdp.name == "fsdp" and fsdp.sharded and fsdp.data_parallel() == (1, 2)
    with pytest.raises(ValueError, match="dp_replicate=1 and tp=2 need strategy='fsdp'"):
        strategies.create(tl.Config(tp=2), tl.Topology())
