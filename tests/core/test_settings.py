"""Settings: each declared once with its own parser; a strategy's kept in its record; seen flat.

`ddp_*` live in `DDPOptions` (strategies/ddp.py), `fsdp_*` in `FSDPOptions` (strategies/fsdp.py),
the mesh's in `MeshOptions` (mesh.py), nested in `Config`; keywords, flags and `TRAINLOOP_*`
variables keep their flat names. A bad value is a `SettingError` whose `.setting` names it.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import trainloop as tl
from tests.support.reference import regression_data
from trainloop import spawn, strategies
from trainloop.config import SETTINGS, Config, parse_setting, resolve_config
from trainloop.errors import SettingError
from trainloop.spawn import checks
from trainloop.strategies.ddp import DDPOptions
from trainloop.strategies.fsdp import FSDPOptions
from trainloop.strategies.mesh import MeshOptions

# The flat names users write, in the order of --help: unchanged, but fsdp_blocks is now blocks.
FLAT_NAMES = [
    "precision", "fp8_recipe", "fp8_filter", "fp8_all_gather", "accumulate", "strategy", "seed", "log_every", "compile", "compile_options", "timeout",
    "device", "blocks", "fsdp_reshard_after_forward", "fsdp_shard_ends", "fsdp_cpu_offload", "even_batches",
    "activation_checkpointing", "activation_checkpointing_every", "ddp_find_unused_parameters", "ddp_static_graph",
    "ddp_gradient_as_bucket_view", "ddp_bucket_cap_mb", "ddp_comm_hook", "dp_replicate", "dp_shard",
    "tp", "tp_plan", "loss_parallel",
]


def test_the_flat_surface_is_generated_from_the_nested_records():
    assert [s.name for s in SETTINGS] == FLAT_NAMES
    assert list(Config().to_dict()) == FLAT_NAMES
    help_text = spawn.build_parser().format_help()
    for name in FLAT_NAMES:
        assert "--" + name.replace("_", "-") + " " in help_text, name
    assert "--fsdp-blocks" not in help_text  # the old name is accepted, not listed


def test_a_strategys_settings_live_in_its_record():
    config = tl.init(ddp_bucket_cap_mb=50, ddp_comm_hook="fp16", fsdp_cpu_offload=True, dp_shard=1).config
    assert config.ddp == DDPOptions(bucket_cap_mb=50.0, comm_hook="fp16")
    assert config.fsdp == FSDPOptions(cpu_offload=True)
    assert config.mesh == MeshOptions(dp_shard=1)
    assert Config(ddp=DDPOptions(bucket_cap_mb=50.0)) == Config(ddp_bucket_cap_mb=50)
    # read by the flat name too, as before
    assert (config.ddp_bucket_cap_mb, config.fsdp_cpu_offload, config.dp_shard, config.tp) == (50.0, True, 1, 1)
    record = config.to_dict()
    assert record["ddp_bucket_cap_mb"] == 50.0 and record["fsdp_cpu_offload"] is True and "ddp" not in record
    with pytest.raises(TypeError, match="give the record or its settings, not both"):
        Config(ddp=DDPOptions(), ddp_static_graph=True)
    with pytest.raises(AttributeError, match="no attribute 'ddp_nothing'"):
        config.ddp_nothing  # noqa: B018


@pytest.mark.parametrize(("setting", "value"), [
    ("precision", "fp9"), ("accumulate", 0), ("seed", -1), ("compile", "yes"), ("timeout", float("nan")),
    ("device", "gpu7"), ("blocks", "Block; Head"), ("even_batches", "no"), ("activation_checkpointing", "all"),
    ("ddp_find_unused_parameters", 1), ("ddp_bucket_cap_mb", 0), ("ddp_bucket_cap_mb", float("inf")),
    ("ddp_comm_hook", "int8"), ("fsdp_reshard_after_forward", None), ("fsdp_cpu_offload", "yes"),
    ("dp_replicate", 0), ("dp_shard", 0), ("tp", 1.5), ("tp_plan", {"up": "sideways"}), ("tp_plan", "{"),
])
def test_a_bad_setting_raises_a_setting_error_that_names_it(setting, value):
    with pytest.raises(tl.SettingError) as caught:
        tl.init(**{setting: value})
    assert isinstance(caught.value, ValueError) and caught.value.setting == setting
    assert str(caught.value).startswith(setting + " ")


def test_a_record_built_alone_names_the_flat_setting():
    with pytest.raises(tl.SettingError, match=r"^ddp_bucket_cap_mb must be a number >= 0.001") as caught:
        DDPOptions(bucket_cap_mb=0)
    assert caught.value.setting == "ddp_bucket_cap_mb"
    with pytest.raises(tl.SettingError, match=r"^fsdp_cpu_offload must be True or False") as caught:
        FSDPOptions(cpu_offload="yes")
    assert caught.value.setting == "fsdp_cpu_offload"


def test_a_bad_variable_names_the_variable_and_the_setting(monkeypatch):
    monkeypatch.setenv("TRAINLOOP_DDP_BUCKET_CAP_MB", "big")
    with pytest.raises(tl.SettingError, match=r"^TRAINLOOP_DDP_BUCKET_CAP_MB: ddp_bucket_cap_mb must be a number "
                                              r"\(got 'big'\)") as caught:
        tl.init()
    assert caught.value.setting == "ddp_bucket_cap_mb"
    monkeypatch.setenv("TRAINLOOP_DDP_BUCKET_CAP_MB", "0")
    with pytest.raises(tl.SettingError, match=r"^TRAINLOOP_DDP_BUCKET_CAP_MB: ddp_bucket_cap_mb must be a number >= ") \
            as caught:
        tl.init()
    assert caught.value.setting == "ddp_bucket_cap_mb"


def test_a_strategy_refusing_a_combination_names_the_setting():
    with pytest.raises(tl.SettingError, match="need strategy='fsdp'") as caught:
        tl.init(tp=2)
    assert caught.value.setting == "tp"
    two = tl.Topology(rank=0, world_size=2, local_world_size=2, backend="gloo")
    with pytest.raises(tl.SettingError, match="ddp_static_graph=True does not work with accumulate=2") as caught:
        strategies.create(Config(ddp_static_graph=True, accumulate=2), two)
    assert caught.value.setting == "ddp_static_graph"


def test_a_setting_error_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(tl.SettingError("tp", "tp must be a number >= 1 (got 0)")))
    assert (error.setting, str(error)) == ("tp", "tp must be a number >= 1 (got 0)")


@pytest.mark.parametrize(("setting", "text", "value"), [
    ("device", "cuda:1", "cuda:1"),             # a None default: still text
    ("tp_plan", '{"up": "colwise"}', {"up": "colwise"}),  # a None default: JSON
    ("compile", "blocks", "blocks"), ("compile", "on", True),
    ("dp_shard", "-1", -1), ("ddp_bucket_cap_mb", "50", 50.0), ("fsdp_cpu_offload", "yes", True),
    ("fsdp_blocks", "Block", "Block"),
])
def test_each_setting_parses_text_with_its_own_parser(setting, text, value):
    assert parse_setting(setting, text) == value


def test_each_setting_declares_its_parser():
    assert all(callable(s.parse) for s in SETTINGS)
    with pytest.raises(tl.SettingError, match=r"^timeout must be a number \(got 'soon'\)") as caught:
        parse_setting("timeout", "soon")
    assert caught.value.setting == "timeout"


# -- blocks, and its old name fsdp_blocks --------------------------------------------------------


def test_fsdp_blocks_is_the_old_name_of_blocks(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # accepted without a DeprecationWarning
        config = tl.init(fsdp_blocks="Block").config
        assert config.blocks == "Block" and config.fsdp_blocks == "Block"
        assert Config(fsdp_blocks="Block") == Config(blocks="Block")
        assert resolve_config({}, {"TRAINLOOP_FSDP_BLOCKS": "Block"}).blocks == "Block"
    with pytest.raises(TypeError, match="give blocks only"):
        tl.init(blocks="Block", fsdp_blocks="Block")
    with pytest.warns(UserWarning, match=r"TRAINLOOP_BLOCKS='Head' overrides init\(blocks='Block'\)"):
        assert resolve_config({"fsdp_blocks": "Block"}, {"TRAINLOOP_BLOCKS": "Head"}).blocks == "Head"
    options = spawn.parse_command_line(spawn.build_parser(), ["--fsdp-blocks", "Block", "train.py"])
    assert options.blocks == "Block" and checks.validated_settings({"blocks": options.blocks}, {}) == {"blocks": "Block"}
    assert checks.validated_settings({"fsdp_blocks": "Block"}, {}) == {"blocks": "Block"}


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 6)

    def forward(self, x):
        return torch.tanh(self.linear(x))


class Outer(nn.Module):
    """Its largest ModuleList holds Inner blocks; `blocks="Linear"` names other ones."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Inner() for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("name", ["blocks", "fsdp_blocks"])
def test_blocks_choose_what_activation_checkpointing_wraps_without_fsdp(name):
    x = regression_data(4).tensors[0]
    plain, model = Outer(), Outer()
    config = Config(activation_checkpointing="blocks", **{name: "Linear"})
    strategies.create(config, tl.Topology()).wrap(model)
    wrapped = [type(m._checkpoint_wrapped_module).__name__ for m in model.modules()
               if type(m).__name__ == "CheckpointWrapper"]
    assert wrapped == ["Linear", "Linear"]  # the named class, not the default (Inner)
    plain(x).sum().backward()
    model(x).sum().backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(plain.parameters(), model.parameters()))


def test_compile_options_are_torch_compiles_own_and_need_compile():
    assert tl.init(compile="blocks", compile_options='{"backend": "aot_eager"}').config.compile_options == {
        "backend": "aot_eager"}
    with pytest.raises(SettingError, match=r"compile_options has unknown option\(s\) \['backnd'\]; the options are "
                                           "backend, fullgraph, mode, dynamic"):
        tl.init(compile=True, compile_options={"backnd": "eager"})
    with pytest.raises(SettingError, match="compile_options are given, but compile is False"):
        tl.init(compile_options={"backend": "eager"})
    with pytest.raises(SettingError, match="activation_checkpointing must be one of 'none', 'blocks', 'selective'"):
        tl.init(activation_checkpointing="some")
