"""The torchtitan recipe's combinations (issue 20): each exact against one process, or refused.

One call of `titan_checks` on 4 ranks trains every 4-rank case in the same processes (in the session's
shared 4-rank job, tests/support/shared_job.py)
(tests/titan_workers.py); each case's whole weights after two AdamW steps are compared with
plain PyTorch on one process over the same global batch (tests/titan_models.py). Compiled cases
use the `aot_eager` backend (`compile_options`): AOTAutograd's backward is where the broken
combinations broke, and inductor's code generation would cost minutes on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from tests.strategies import titan_models
from tests.strategies.titan_models import LENGTH, SP_PLAN, TP_PLAN, Transformer, reference_loop, token_data
from tests.strategies.titan_workers import BATCH, STEPS, build, titan_checks
from tests.support import shared_job

AOT = {"backend": "aot_eager"}
# fp8: each micro-batch's activations are scaled by their own amax, and the 4 ranks' micro-batches
# group the samples otherwise than one process does.
FP8_ATOL = 1e-3
FSDP4 = {"strategy": "fsdp", "dp_shard": 4}
TP2 = {"strategy": "fsdp", "dp_shard": 2, "tp": 2}

CASES = {
    # item 1: compile="blocks" + TP with a TP-sharded embedding
    "tp_compile": (TP2 | {"tp_plan": TP_PLAN, "compile": "blocks", "compile_options": AOT}, "titan"),
    # item 6: sequence-parallel norms + AC + compile
    "sp_ac_compile": (TP2 | {"tp_plan": SP_PLAN, "activation_checkpointing": "blocks", "compile": "blocks",
                             "compile_options": AOT}, "titan"),
    # item 7: torchtitan's ModuleDict of layers, found as blocks by FSDP and AC
    "moduledict_ac": (FSDP4 | {"activation_checkpointing": "blocks"}, "titan"),
    # item 5: AC + compile="blocks" on Hugging Face models
    "llama_ac_compile": (FSDP4 | {"activation_checkpointing": "blocks", "compile": "blocks",
                                  "compile_options": AOT}, "llama"),
    "gpt2_ac_compile": (FSDP4 | {"activation_checkpointing": "blocks", "compile": "blocks",
                                 "compile_options": AOT}, "gpt2"),
    # selective activation checkpointing: op-level, and every second block
    "selective": (FSDP4 | {"activation_checkpointing": "selective"}, "titan"),
    "every_second_block": (TP2 | {"tp_plan": TP_PLAN, "activation_checkpointing": "blocks",
                                  "activation_checkpointing_every": 2}, "titan"),
    # item 6: Hugging Face Llama's plan with sequence-parallel norms, AC and compile
    "llama_sp_ac_compile": (TP2 | {"tp_plan": "llama+sp", "activation_checkpointing": "blocks", "compile": "blocks",
                                   "compile_options": AOT}, "llama"),
    # item 6: fp8 with sequence-parallel norms is refused before anything is sharded
    "fp8_sp": (TP2 | {"tp_plan": SP_PLAN, "precision": "fp8"}, "titan"),
}
# fp8 with plain TP, against one process in fp8 (not plain PyTorch: the float8 casts are torchao's).
# SGD: AdamW turns the float8 rounding of near-zero gradients into whole +-lr steps.
FP8 = {"fp8_tp": (TP2 | {"tp_plan": TP_PLAN, "precision": "fp8"}, "titan", {"sgd": True})}
# torchtitan's Transformer above, by hand: per layer attention 32x32 + 2 x 32x16 + 32x32, two norms of
# 32, feed-forward 3 x 32x64; two layers, the final norm 32, the head 32x64 (the embedding is left
# out). 6 N + 12 L H Q T with L=2, H=4, Q=8, T=8.
NON_EMBEDDING_PARAMETERS = 2 * (1024 + 512 + 512 + 1024 + 64 + 3 * 2048) + 32 + 2048
FLOPS_PER_TOKEN = 6 * NON_EMBEDDING_PARAMETERS + 12 * 2 * 4 * 8 * 8
# Throughput under dp_shard=2 x tp=2 with AC: model FLOPs from a hand count (FLOPS_PER_TOKEN).
THROUGHPUT = {
    "throughput": (TP2 | {"tp_plan": TP_PLAN, "activation_checkpointing": "blocks", "log_every": 1}, "titan",
                   {"steps": 3, "throughput": {"tokens": LENGTH, "flops_per_token": FLOPS_PER_TOKEN, "peak_flops": 1e12}}),
    "throughput_counted": (TP2 | {"tp_plan": TP_PLAN, "log_every": 1}, "titan",
                           {"steps": 3, "throughput": {"tokens": LENGTH}}),
}


TITAN = shared_job.Call(titan_checks, n=4, args=lambda _: (CASES | FP8 | THROUGHPUT,))


@pytest.fixture(scope="module")
def four(request) -> dict:
    return TITAN.result(request)


def one_process(kind: str, data_parallel: int) -> dict[str, torch.Tensor]:
    return reference_loop(build(kind), token_data(), big_batch=BATCH * data_parallel, steps=STEPS)


def assert_exact(found: dict, expected: dict, atol: float = 2e-5) -> None:
    titan_models.assert_exact(found, expected, steps=STEPS, atol=atol)


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", sorted(set(CASES) - {"fp8_sp"}))
def test_the_combination_equals_one_process_over_the_global_batch(four, case):
    settings, kind = CASES[case]
    data_parallel = 4 // settings.get("tp", 1)
    assert_exact(four[case], one_process(kind, data_parallel))


@pytest.mark.multiprocess
def test_a_tp_sharded_embedding_trains_under_compiled_blocks(four):
    """Item 1: its gradient was exactly zero (the weights stayed as initialised)."""
    initial = Transformer().tok_embeddings.weight
    assert (four["tp_compile"]["weights"]["tok_embeddings.weight"] - initial).abs().max() > 1e-3


@pytest.mark.multiprocess
def test_module_dict_layers_are_sharded_and_checkpointed_one_by_one(four):
    """Item 7: each of the ModuleDict's layers is its own FSDP unit, inside a checkpoint wrapper;
    the embedding, and the final norm with the head, are units of their own (fsdp_shard_ends)."""
    units = four["moduledict_ac"]["units"]
    assert units == ["", "tok_embeddings", "layers.0", "layers.1", "norm", "output"]
    assert four["moduledict_ac"]["checkpointed"] == ["layers.0", "layers.1"]


@pytest.mark.multiprocess
def test_the_checkpoint_wrapped_block_is_what_gets_compiled(four):
    """Item 5: torchtitan's order, the wrapper compiled (not the block inside it), then sharded."""
    assert four["llama_ac_compile"]["compiled"] == ["model.layers.0", "model.layers.1"]
    assert four["llama_ac_compile"]["checkpointed"] == ["model.layers.0", "model.layers.1"]


@pytest.mark.multiprocess
def test_the_embedding_and_the_head_are_units_of_their_own_unless_tied(four):
    assert four["llama_ac_compile"]["units"] == ["", "model.embed_tokens", "model.layers.0", "model.layers.1",
                                                 "model.norm", "lm_head"]
    # GPT-2's head is its token embedding: one parameter cannot be in two units, both stay in the root.
    assert four["gpt2_ac_compile"]["units"] == ["", "transformer.h.0", "transformer.h.1"]


@pytest.mark.multiprocess
def test_every_second_block_is_checkpointed(four):
    assert four["every_second_block"]["checkpointed"] == ["layers.0"]


def test_model_flops_per_token_is_the_hand_count():
    from trainloop.callbacks.throughput import model_flops_per_token

    assert NON_EMBEDDING_PARAMETERS == 20640
    assert model_flops_per_token(Transformer(), LENGTH, layers=2, heads=4, head_dim=8) == FLOPS_PER_TOKEN
    llama = build("llama")  # its config: 2 layers, 2 heads of 16; embedding and head untied
    n = sum(p.numel() for name, p in llama.named_parameters() if "embed_tokens" not in name)
    assert model_flops_per_token(llama, 6) == 6 * n + 12 * 2 * 2 * 16 * 6
    gpt2 = build("gpt2")  # a tied head: the embedding's weight is also the head's matmul
    n = sum(p.numel() for name, p in gpt2.named_parameters() if name != "transformer.wpe.weight")
    assert model_flops_per_token(gpt2, 6) == 6 * n + 12 * 2 * 2 * 16 * 6
    with pytest.raises(ValueError, match="pass layers=, heads= and head_dim="):
        model_flops_per_token(Transformer(), LENGTH)


@pytest.mark.multiprocess
def test_throughput_counts_data_parallel_replicas_and_model_flops_per_device(four):
    """dp 2 x tp 2: samples and tokens summed over the 2 replicas; FLOP/s shared by 2 devices each."""
    records = [r for r in four["throughput"]["metrics"] if "throughput/samples_per_sec" in r]
    assert [r["step"] for r in records] == [2, 3]  # step 1 starts the clock
    for record in records:
        samples, seconds = record["throughput/samples_per_sec"], record["throughput/step_time_sec"]
        # Means over the ranks, each rank timed on its own clock: equal to within the ranks' skew.
        assert samples * seconds == pytest.approx(2 * BATCH, rel=1e-2)  # 2 replicas x BATCH a step
        assert record["throughput/tokens_per_sec"] == pytest.approx(samples * LENGTH, rel=1e-6)
        per_device = record["throughput/tokens_per_sec"] * FLOPS_PER_TOKEN / 4  # 4 devices
        assert record["throughput/tflops_per_sec"] == pytest.approx(per_device / 1e12, rel=1e-6)
        assert record["throughput/mfu"] == pytest.approx(per_device / 1e12, rel=1e-6)  # peak 1e12


@pytest.mark.multiprocess
def test_counted_flops_under_tensor_parallelism_are_not_reported_as_model_flops(four):
    records = [r for r in four["throughput_counted"]["metrics"] if "throughput/samples_per_sec" in r]
    assert records and all("throughput/hardware_tflops_per_sec" in r for r in records)
    assert not [r for r in records if "throughput/tflops_per_sec" in r or "throughput/mfu" in r]


@pytest.mark.multiprocess
def test_fp8_with_sequence_parallel_norms_is_refused_naming_the_way_out(four):
    message = four["fp8_sp"]["refused"]
    assert "precision='fp8' with tp_plan's 'sequence_parallel' style ('layers.0.attention_norm')" in message
    assert "Use precision='bf16' with sequence parallelism" in message


@pytest.mark.multiprocess
def test_fp8_with_tensor_parallelism_follows_one_process_in_fp8(four):
    from tests.strategies.titan_workers import train_run

    one = train_run({"precision": "fp8", "accumulate": 2}, "titan", {"sgd": True})  # micro-batches of 2, 4 a step
    assert_exact(four["fp8_tp"], one["weights"], atol=FP8_ATOL)
