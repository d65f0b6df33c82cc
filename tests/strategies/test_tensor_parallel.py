"""Tensor parallelism from a plan (trainloop.strategies.tensor_parallel).

The plan's checks (patterns, styles, Hugging Face plans) run in this process; one call
of `tp_checks` on 4 ranks (the session's shared 4-rank job) (dp_shard=2 x tp=2) compares sharded models with the same models
whole: forward outputs and gradients (tests/strategies/tensor_parallel_workers.py).
"""

from __future__ import annotations

import pytest
from torch import nn

from tests.strategies.tensor_parallel_workers import Stack, tp_checks
from tests.support import shared_job
from trainloop.config import TP_STYLES
from trainloop.strategies.tensor_parallel import apply_tp_plan, hugging_face_plan, matching_modules, parallel_style

ATOL = 1e-5


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)


def test_a_star_matches_one_dotted_part():
    names = ["blocks", "blocks.0", "blocks.0.up", "blocks.0.inner.up", "blocks.1.up", "head"]
    assert matching_modules(names, "blocks.*.up") == ["blocks.0.up", "blocks.1.up"]
    assert matching_modules(names, "head") == ["head"]
    assert matching_modules(names, "blocks.[01].up") == ["blocks.0.up", "blocks.1.up"]


def test_every_style_has_a_torch_counterpart():
    assert parallel_style("replicate") is None  # left whole
    for style in set(TP_STYLES) - {"replicate"}:
        assert parallel_style(style) is not None
    with pytest.raises(ValueError, match="unknown tensor-parallel style 'diagonal'"):
        parallel_style("diagonal")


def test_a_pattern_that_matches_nothing_lists_the_modules():
    with pytest.raises(ValueError, match=r"'layers\.\*\.up' matches no module of Stack; its modules are blocks"):
        apply_tp_plan(Stack(), None, {"layers.*.up": "colwise"})


def test_a_module_two_patterns_match_is_refused():
    with pytest.raises(ValueError, match=r"'blocks\.\*\.up' and 'blocks\.0\.up' both match module 'blocks\.0\.up'"):
        apply_tp_plan(Stack(), None, {"blocks.*.up": "colwise", "blocks.0.up": "rowwise"})


def test_an_unknown_style_is_refused_before_anything_is_sharded():
    model = Stack()
    with pytest.raises(ValueError, match="unknown tensor-parallel style 'colwize'"):
        apply_tp_plan(model, None, {"blocks.*.up": "colwise", "blocks.*.down": "colwize"})
    assert all(type(p) is nn.Parameter for p in model.parameters())


def test_a_model_without_a_plan_of_its_own_needs_one():
    with pytest.raises(ValueError, match="Stack has none of its own .* init\\(tp_plan="):
        apply_tp_plan(Stack(), None)


def test_hugging_face_plans_are_keyed_from_the_model_given():
    from transformers import LlamaForCausalLM, LlamaModel

    config = _llama_config()
    causal_lm, base = hugging_face_plan(LlamaForCausalLM(config)), hugging_face_plan(LlamaModel(config))
    assert base == dict(config.base_model_tp_plan)
    assert causal_lm == {f"model.{key}": style for key, style in config.base_model_tp_plan.items()}
    assert causal_lm["model.layers.*.mlp.down_proj"] == "rowwise"


TP = shared_job.Call(tp_checks, n=4)


@pytest.fixture(scope="module")
def four_ranks(request) -> list[dict]:
    return TP.result(request)["ranks"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", ["mlp", "sequence_parallel", "gathered", "llama"])
def test_sharded_equals_whole(four_ranks, case):
    for rank, report in enumerate(four_ranks):
        assert report[case]["output_error"] <= ATOL, (rank, case)
        assert report[case]["gradient_error"] <= ATOL, (rank, case)


@pytest.mark.multiprocess
def test_the_two_tp_groups_saw_different_batches(four_ranks):
    assert [r["dp_rank"] for r in four_ranks] == [0, 0, 1, 1]


@pytest.mark.multiprocess
def test_colwise_then_rowwise_shards_as_megatron_does(four_ranks):
    mlp = four_ranks[0]["mlp"]
    assert mlp["placements"]["blocks.0.up.weight"] == "(Shard(dim=0),)"
    assert mlp["placements"]["blocks.0.down.weight"] == "(Shard(dim=1),)"
    assert mlp["placements"]["blocks.0.down.bias"] == "(Replicate(),)"
    assert mlp["local_shapes"]["blocks.0.up.weight"] == [8, 8]  # half of (16, 8)
    assert "head.weight" not in mlp["sharded"]


@pytest.mark.multiprocess
def test_replicate_leaves_a_module_whole_and_rep_styles_shard(four_ranks):
    gathered = four_ranks[0]["gathered"]
    assert not [name for name in gathered["sharded"] if name.startswith("blocks.0.down")]
    assert gathered["placements"]["head.weight"] == "(Shard(dim=1),)"
    assert gathered["local_shapes"]["head.weight"] == [6, 4]


@pytest.mark.multiprocess
def test_sequence_parallel_replicates_the_norm(four_ranks):
    placements = four_ranks[0]["sequence_parallel"]["placements"]
    assert placements["blocks.0.norm.weight"] == "(Replicate(),)"


@pytest.mark.multiprocess
def test_the_llama_plan_shards_attention_and_mlp(four_ranks):
    sharded = four_ranks[0]["llama"]["sharded"]
    assert {"model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight",
            "model.layers.0.mlp.down_proj.weight"} <= set(sharded)
    assert not [name for name in sharded if "embed" in name or "norm" in name or "lm_head" in name]


@pytest.mark.multiprocess
def test_a_model_on_the_meta_device_is_sharded_without_memory(four_ranks):
    assert four_ranks[0]["meta"] == {"dtensor": True, "is_meta": True, "local_shape": [8, 8]}


def test_an_empty_plan_or_one_that_shards_nothing_is_refused_naming_the_modules():
    with pytest.raises(ValueError, match=r"tp_plan is empty, so tp > 1 would run the whole of Stack .*its modules "
                                         r"are blocks, blocks\.0, blocks\.0\.norm, blocks\.0\.up"):
        apply_tp_plan(Stack(), None, {})
    with pytest.raises(ValueError, match=r"tp_plan \{'blocks\.\*\.up': 'replicate'\} shards no module"):
        apply_tp_plan(Stack(), None, {"blocks.*.up": "replicate"})


def test_a_style_the_module_type_cannot_take_names_the_pattern_the_module_and_its_styles():
    model = Stack(norm=True)
    with pytest.raises(ValueError, match=r"tp_plan pattern 'blocks\.\*\.norm' gives 'colwise' to 'blocks\.0\.norm', "
                                         r"a LayerNorm: .* A LayerNorm takes 'sequence_parallel' or 'replicate'"):
        apply_tp_plan(model, None, {"blocks.*.up": "colwise", "blocks.*.norm": "colwise"})
    assert all(type(p) is nn.Parameter for p in model.parameters())  # refused before anything is sharded
