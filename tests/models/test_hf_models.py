"""Hugging Face models through trainloop: the prepared model behaves like the user's model.

Tiny GPT-2 and Llama models built from configs (tests/support/hf_models.py), never downloaded.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2LMHeadModel, GPT2Model, LlamaForCausalLM, LlamaModel
from transformers.modeling_outputs import ModelOutput

import trainloop as tl
from tests.models.hf_workers import two_rank_hf_checks
from tests.support.hf_models import (
    BUILDERS,
    CLASSES,
    CONFIGS,
    gpt2_config,
    greedy,
    llama_config,
    prompt,
    tiny_gpt2,
    tiny_llama,
)
from trainloop import spawn
from trainloop.bigmodel import device_map, empty_weights, load_and_dispatch
from trainloop.precision import Autocast


def compute_dtypes(model: nn.Module) -> list[tuple[torch.dtype, bool]]:
    """Forward hooks on every Linear-like leaf recording (output dtype, autocast on?) per call."""
    seen: list[tuple[torch.dtype, bool]] = []
    for module in model.modules():
        if type(module).__name__ in ("Linear", "Conv1D"):  # GPT-2's projections are Conv1D
            module.register_forward_hook(
                lambda _module, _args, output: seen.append((output.dtype, torch.is_autocast_enabled("cpu"))))
    return seen


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generate_on_the_prepared_model_runs_under_the_bf16_policy(name):
    _, model = tl.prepare(tl.init(precision="bf16"), BUILDERS[name]())
    assert isinstance(model, Autocast)
    users = tl.unwrap(model)
    seen = compute_dtypes(users)
    ids = prompt()
    tokens = greedy(model, ids)
    assert seen and set(seen) == {(torch.bfloat16, True)}  # every projection computed in bf16
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = greedy(users, ids)  # what PyTorch's own recipe gives
    assert torch.equal(tokens, expected)
    assert model.generate.__name__ == "generate" and "generate" in dir(model)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_config_device_dtype_and_save_pretrained_reach_the_users_model(name, tmp_path):
    _, model = tl.prepare(tl.init(precision="bf16"), BUILDERS[name]())
    users = tl.unwrap(model)
    assert model.config is users.config
    assert model.device == torch.device("cpu")
    assert model.dtype == torch.float32  # the model's parameter dtype, not the policy's bf16
    assert model.lm_head is users.lm_head  # submodules are the user's own objects
    output = model(prompt())
    assert isinstance(output, ModelOutput) and output.logits.dtype == torch.float32  # .logits, widened
    model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = CLASSES[name].from_pretrained(tmp_path)
    for key, value in users.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_assigning_an_attribute_the_model_has_sets_it_on_the_model():
    _, model = tl.prepare(tl.init(precision="bf16"), tiny_gpt2())
    users = tl.unwrap(model)
    config = users.config.__class__.from_dict(users.config.to_dict())
    model.config = config  # what generate reads: it must reach the user's model
    assert users.config is config and model.config is config
    model.generation_config.max_new_tokens = 3
    assert users.generation_config.max_new_tokens == 3
    model.brand_new = 1  # a name the model does not have stays on the wrapper
    assert model.brand_new == 1 and not hasattr(users, "brand_new")
    del model.brand_new
    assert not hasattr(model, "brand_new")


class Encoder(nn.Module):
    """A user's model with a method of its own beside forward, and a plain attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.temperature = 2.0
        self._private = "internal"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    def embed(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return self.proj(x) * scale / self.temperature


def test_a_users_own_method_runs_under_the_policy_and_returns_fp32():
    _, model = tl.prepare(tl.init(precision="bf16"), Encoder())
    users = tl.unwrap(model)
    x = torch.randn(4, 8)
    seen = []
    users.proj.register_forward_hook(lambda _m, _a, out: seen.append((out.dtype, torch.is_autocast_enabled("cpu"))))
    embedded = model.embed(x, scale=3.0)
    assert seen == [(torch.bfloat16, True)]
    assert embedded.dtype == torch.float32  # widened at the boundary, as the forward's outputs are
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = users.embed(x, scale=3.0)
    assert torch.equal(embedded, expected.float())
    assert model.temperature == 2.0
    model.temperature = 4.0
    assert users.temperature == 4.0
    with pytest.raises(AttributeError, match="_private"):
        model._private  # noqa: B018 (private names are not forwarded: reach them through tl.unwrap)
    with pytest.raises(AttributeError, match=r"Autocast \(prepared Encoder\) has no attribute 'missing'"):
        model.missing  # noqa: B018
    assert type(users) is Encoder and "embed" not in vars(users)  # nothing patched


def test_bf16_true_methods_cast_floating_inputs_as_the_forward_does():
    _, model = tl.prepare(tl.init(precision="bf16-true"), Encoder())
    embedded = model.embed(torch.randn(4, 8))  # fp32 data meets bf16 weights
    assert embedded.dtype == torch.float32


def test_the_policy_settings_do_not_hide_the_models_attributes():
    class HasDtype(Encoder):
        device_type = "mine"

    _, model = tl.prepare(tl.init(precision="bf16"), HasDtype())
    assert model.device_type == "mine"


# -- big models: load_and_dispatch, key remapping, no_split from the model ---------------------

BASE_CLASSES = {"gpt2": GPT2Model, "llama": LlamaModel}


def sharded_checkpoint(module: nn.Module, directory) -> list[str]:
    """`save_pretrained` in small shards; returns the shard names (checking there are several)."""
    module.save_pretrained(directory, safe_serialization=True, max_shard_size="20KB")
    shards = sorted(path.name for path in directory.glob("*.safetensors"))
    assert len(shards) > 2 and (directory / "model.safetensors.index.json").is_file()
    return shards


def build_tied(name: str):
    """The model with a head tied to its embedding (a base checkpoint then holds every weight)."""
    return tiny_gpt2() if name == "gpt2" else tiny_llama(tied=True)


def config_tied(name: str):
    return gpt2_config() if name == "gpt2" else llama_config(tied=True)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_base_models_sharded_checkpoint_loads_into_the_causal_lm_with_cpu_and_disk_offload(name, tmp_path):
    full = build_tied(name)
    ids = prompt()
    with torch.no_grad():
        expected = full(ids).logits
    expected_tokens = greedy(full, ids)
    sharded_checkpoint(full.base_model, tmp_path)  # keys without `transformer.` / `model.`

    model = load_and_dispatch(lambda: CLASSES[name](config_tied(name)), tmp_path,
                              max_memory={"cpu": 40_000, "disk": "1GB"})
    placement = device_map(model, max_memory={"cpu": 40_000, "disk": "1GB"})
    assert {"cpu", "disk"} <= set(placement.values())
    blocks = "transformer.h" if name == "gpt2" else "model.layers"
    assert f"{blocks}.0" in placement and not any(key.startswith(f"{blocks}.0.") for key in placement)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
    assert torch.equal(greedy(model, ids), expected_tokens)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still tied


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_causal_lms_checkpoint_loads_into_its_base_model(name, tmp_path):
    full = BUILDERS[name]()
    ids = prompt()
    with torch.no_grad():
        expected = full.base_model(ids).last_hidden_state
    sharded_checkpoint(full, tmp_path)  # keys with `transformer.` / `model.`, and lm_head
    second_block = "h.1" if name == "gpt2" else "layers.1"
    base = load_and_dispatch(lambda: BASE_CLASSES[name](CONFIGS[name]()), tmp_path,
                             {"": "cpu", second_block: "disk"})
    assert all(p.is_meta for p in base.get_submodule(second_block).parameters())  # streamed from disk
    with torch.no_grad():
        assert torch.equal(base(ids).last_hidden_state, expected)


def test_an_untied_llamas_full_checkpoint_on_one_device_and_with_disk_offload(tmp_path):
    full = tiny_llama()
    ids = prompt()
    expected_tokens = greedy(full, ids)
    sharded_checkpoint(full, tmp_path)
    on_cpu = load_and_dispatch(lambda: LlamaForCausalLM(llama_config()), tmp_path, "cpu")
    assert on_cpu.lm_head.weight is not on_cpu.model.embed_tokens.weight
    assert torch.equal(greedy(on_cpu, ids), expected_tokens)
    with empty_weights():
        model = LlamaForCausalLM(llama_config())
    offloaded = load_and_dispatch(model, tmp_path, {"": "cpu", "model.layers": "disk", "lm_head": "disk"})
    assert offloaded is model and model.model.layers[0].mlp.up_proj.weight.is_meta
    assert torch.equal(greedy(offloaded, ids), expected_tokens)


def test_device_map_keeps_the_models_no_split_modules_whole_by_default():
    with empty_weights():
        model = GPT2LMHeadModel(gpt2_config())
    block = sum(t.numel() * 4 for t in [*model.transformer.h[0].parameters(), *model.transformer.h[0].buffers()])
    budget = {"cpu": 2 * block // 3 + 64 * 32 * 4 + 32 * 32 * 4, "disk": "1GB"}  # embeddings and part of a block
    default = device_map(model, max_memory=budget)
    assert default["transformer.h.0"] == "disk"  # GPT2Block, from GPT2LMHeadModel._no_split_modules
    free = device_map(model, max_memory=budget, no_split=())
    assert any(key.startswith("transformer.h.0.") for key in free)  # () splits freely


# -- two ranks: DDP and pipeline inference ----------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    sharded_checkpoint(tiny_gpt2().base_model, directory / "gpt2-base")  # keys without `transformer.`
    sharded_checkpoint(tiny_llama(), directory / "llama")
    checkpoints = {"gpt2": str(directory / "gpt2-base"), "llama": str(directory / "llama")}
    return spawn.run(two_rank_hf_checks, checkpoints, n=2)


@pytest.mark.multiprocess
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_generate_and_config_reach_the_model_through_ddp(two_ranks, precision):
    checks = two_ranks[precision]
    assert checks["is_ddp"]
    assert checks["wrappers"][0] == ("Autocast" if precision == "bf16" else "DistributedDataParallel")
    assert checks["generate_equal"] and checks["config_is_users"] and checks["ddp_keeps_its_own"]
    assert checks["config_set_reaches_users"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_pipeline_on_two_ranks_gives_the_plain_models_logits_and_output_type(two_ranks, name):
    result = two_ranks[name]
    full = BUILDERS[name]()
    ids = prompt(batch=4)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        expected = full(ids, attention_mask=mask).logits
        unmasked = full(ids).logits
    assert result["type"] == result["unmasked_type"] == type(full(ids)).__name__
    assert torch.equal(result["logits"], expected)  # a meta model, loaded stage by stage
    assert torch.equal(result["unmasked"], unmasked)  # the model's own weights
    assert not torch.equal(expected, unmasked)  # the mask was really used


@pytest.mark.multiprocess
def test_pipeline_takes_keyword_inputs_and_refuses_values_it_was_not_traced_for(two_ranks):
    checks = two_ranks["keywords"]
    assert checks["type"] == "dict" and checks["equal"]
    scale, shape = checks["refusals"]
    assert "traced with scale=2.0, got scale=3.0" in scale
    assert "traced for inputs float32[4, 8], mask=float32[4, 8], got float32[4, 8], mask=float32[4, 4]" in shape


def test_fsdp_blocks_default_to_the_models_own_no_split_modules():
    from trainloop.strategies.blocks import find_blocks

    model = tiny_gpt2(layers=2)  # declares _no_split_modules = ["GPT2Block"]
    blocks = find_blocks(model)
    assert [type(block).__name__ for block in blocks] == ["GPT2Block", "GPT2Block"]
    assert {id(block) for block in blocks} == {id(layer) for layer in model.transformer.h}
