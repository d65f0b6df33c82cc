"""fp8 recipes (issue 20): torchao's own config objects, a filter of layers left in bf16, and
FSDP2's float8 all-gather, each checked against torchao used directly; combinations that cannot
work are refused by the settings, naming the way out.

On the CPU the conversion and the training run in torchao's emulation (its casts and scales,
matmuls in high precision); the GPU-marked test runs the float8 kernels and skips without CUDA.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trainloop as tl
from tests.core.fp8_workers import fsdp_all_gather_checks, net
from trainloop import spawn
from trainloop.config import settings_from_env
from trainloop.errors import SettingError

torchao_float8 = pytest.importorskip("torchao.float8")
Float8LinearConfig = torchao_float8.Float8LinearConfig
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class Model(nn.Module):
    """Three eligible layers (multiples of 16) and one that is not (10 outputs)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
        self.output = nn.Linear(32, 32)
        self.classes = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classes(self.output(self.body(x)))


def float8_layers(model: nn.Module) -> dict[str, object]:
    from torchao.float8.float8_linear import Float8Linear

    return {name: m.config for name, m in tl.unwrap(model).named_modules() if isinstance(m, Float8Linear)}


def prepared(**settings):
    state = tl.init(precision="fp8", seed=0, **settings)
    model = Model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return (*tl.prepare(state, model, optimizer), model)


def emulated(recipe: str) -> object:
    return dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=True)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_each_recipe_is_torchaos_own_config_and_trains_as_torchao_does(recipe):
    state, model, optimizer, built = prepared(fp8_recipe=recipe)
    layers = float8_layers(model)
    assert sorted(layers) == ["body.0", "body.2", "output"]  # classes (10 outputs) stays bf16
    assert all(config == emulated(recipe) for config in layers.values()), layers
    # The reference: torchao's conversion of the same model, run under bf16 autocast by hand.
    reference = torchao_float8.convert_to_float8_training(Model(), config=emulated(recipe),
                                                          module_filter_fn=lambda m, name: name != "classes")
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    x, y = torch.randn(8, 32, generator=torch.Generator().manual_seed(1)), torch.randn(8, 10)
    for _ in range(2):
        state = tl.step(tl.backward(state, F.mse_loss(model(x), y)), optimizer)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = reference(x)
        F.mse_loss(out.float(), y).backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad()
    for (name, mine), theirs in zip(built.named_parameters(), reference.parameters()):
        assert torch.equal(mine, theirs), name
    assert not torch.equal(built.body[0].weight, Model().body[0].weight)  # it trained


def test_rowwise_differs_from_tensorwise_in_its_scales():
    assert emulated("rowwise") != emulated("tensorwise")  # the parametrised test then tells them apart
    rowwise = float8_layers(prepared(fp8_recipe="rowwise")[1])["output"]
    assert rowwise.cast_config_weight.scaling_granularity.value == "axiswise"
    assert rowwise.round_scales_to_power_of_2


def test_a_filter_of_names_leaves_those_layers_in_bf16():
    assert sorted(float8_layers(prepared(fp8_filter="output")[1])) == ["body.0", "body.2"]
    assert sorted(float8_layers(prepared(fp8_filter="output, body.2")[1])) == ["body.0"]
    assert sorted(float8_layers(prepared(fp8_filter=["body"])[1])) == ["output"]


def test_a_filter_callable_chooses_the_converted_layers_among_the_eligible():
    seen = []

    def only_output(module: nn.Module, name: str) -> bool:
        seen.append(name)
        return name == "output" or name == "classes"  # classes is not eligible: never converted

    _, model, _, built = prepared(fp8_filter=only_output)
    assert sorted(float8_layers(model)) == ["output"]
    assert isinstance(built.body[0], nn.Linear) and "body.0" in seen


def test_a_float8_linear_config_is_used_as_given_emulated_on_the_cpu():
    config = Float8LinearConfig(round_scales_to_power_of_2=True, pad_inner_dim=True)
    layers = float8_layers(prepared(fp8_recipe=config)[1])
    assert all(c == dataclasses.replace(config, emulate=True) for c in layers.values()) and len(layers) == 3


def test_the_settings_read_from_the_command_line():
    found = settings_from_env({"TRAINLOOP_FP8_RECIPE": "rowwise", "TRAINLOOP_FP8_FILTER": "output,router",
                               "TRAINLOOP_FP8_ALL_GATHER": "false"})
    assert found == {"fp8_recipe": "rowwise", "fp8_filter": "output,router", "fp8_all_gather": False}


def test_to_dict_stays_plain_values_with_objects_given():
    config = tl.Config(precision="fp8", fp8_recipe=Float8LinearConfig(), fp8_filter=lambda m, n: True).to_dict()
    assert isinstance(config["fp8_recipe"], str) and isinstance(config["fp8_filter"], str)


@pytest.mark.parametrize(("settings", "message"), [
    ({"fp8_recipe": "rowwise"}, "fp8_recipe is set, but precision is 'fp32': set precision='fp8'"),
    ({"fp8_filter": "output"}, "fp8_filter is set, but precision is 'fp32'"),
    ({"fp8_all_gather": True}, "fp8_all_gather=True needs precision='fp8'"),
    ({"precision": "fp8", "fp8_recipe": "blockwise"}, "fp8_recipe must be one of 'tensorwise', 'rowwise'"),
    ({"precision": "fp8", "fp8_filter": 3}, "fp8_filter must be comma-separated module names"),
    ({"precision": "fp8", "fp8_all_gather": True}, "strategy is 'auto': set strategy='fsdp'"),
    ({"precision": "fp8", "strategy": "ddp", "fp8_all_gather": True}, "strategy is 'ddp'"),
    ({"precision": "fp8", "strategy": "fsdp", "fp8_recipe": "rowwise", "fp8_all_gather": True},
     "tensorwise scales only. Use fp8_recipe='tensorwise'"),
    ({"precision": "fp8", "strategy": "fsdp", "fp8_recipe": Float8LinearConfig(), "fp8_all_gather": True},
     "set enable_fsdp_float8_all_gather=True in that config instead"),
    ({"precision": "fp8", "strategy": "ddp", "fp8_recipe": Float8LinearConfig(enable_fsdp_float8_all_gather=True)},
     "enable_fsdp_float8_all_gather=True, which only FSDP2 uses"),
])
def test_combinations_that_cannot_work_are_refused_naming_the_way_out(settings, message):
    with pytest.raises(SettingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tl.Config(**settings)


def test_the_default_recipe_keeps_the_shared_policy_object():
    assert tl.init(precision="fp8").precision is tl.init(precision="fp8", fp8_recipe="tensorwise").precision


# -- FSDP2's float8 all-gather, 2 ranks --------------------------------------------------------------


@pytest.mark.multiprocess
def test_fsdp2_gathers_float8_weights_and_trains_as_the_bf16_gather_does():
    runs = spawn.run(fsdp_all_gather_checks, n=2)
    plain, gathered = runs["bf16_gather"], runs["fp8_gather"]
    assert gathered[0]["configs"] == [True, True] and plain[0]["configs"] == [False, False]
    # torchao's float8-casting weight under FSDP2 (what makes the all-gather float8).
    assert gathered[0]["weight_types"] == ["WeightWithDynamicFloat8CastTensor"] * 2
    assert plain[0]["weight_types"] == ["Tensor"] * 2
    initial = dict(net().named_parameters())
    for name, value in gathered[0]["weights"].items():
        assert torch.equal(value, gathered[1]["weights"][name]), name  # the ranks agree
        # The optimizer stepped the wrapped weights (two steps move each tensor by ~4e-3).
        assert (value - initial[name]).abs().max() > 2e-3, name
        # The same training up to float8 rounding (here within 3e-4): the weights are cast to
        # float8 before the gather, from fp32, instead of after a bf16 gather.
        torch.testing.assert_close(value, plain[0]["weights"][name], atol=1e-3, rtol=0)
    # fp8 + meta-init + float8 all-gather (how a large model is built): the same run, bit for bit.
    meta = runs["meta_fp8_gather"]
    assert meta[0]["weight_types"] == ["WeightWithDynamicFloat8CastTensor"] * 2
    for name, value in gathered[0]["weights"].items():
        assert torch.equal(meta[0]["weights"][name], value), name


# -- a GPU with float8 matmuls -----------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with compute capability >= 8.9 (float8 matmuls)")
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_on_a_float8_gpu_each_recipe_runs_torchaos_kernels(recipe):
    state = tl.init(precision="fp8", fp8_recipe=recipe, device="cuda")
    model = Model()
    reference = torchao_float8.convert_to_float8_training(copy.deepcopy(model).cuda(),
                                                          config=Float8LinearConfig.from_recipe_name(recipe),
                                                          module_filter_fn=lambda m, name: name != "classes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state, prepared_model = tl.prepare(state, model)
    layers = float8_layers(prepared_model)
    assert len(layers) == 3 and not any(config.emulate for config in layers.values())
    x = torch.randn(32, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = reference(x)
    torch.testing.assert_close(prepared_model(x), expected.float())
