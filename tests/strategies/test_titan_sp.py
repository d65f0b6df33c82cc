"""Loss parallelism and sequence parallelism between blocks (issue 20), each exact or refused.

One 4-rank call of `sp_checks` trains every dp_shard=2 x tp=2 case, in the session's shared 4-rank
job (tests/support/shared_job.py: the processes test_titan, test_tensor_parallel and test_mesh use), and
one `spawn.run(..., n=2)` the tp=2 cases alone (tests/strategies/titan_sp_workers.py): AdamW,
gradient clipping, accumulation over two micro-batches. Each case's whole weights after two
steps are compared with plain PyTorch on one process over the same global batch. Compiled cases
use the `aot_eager` backend, as tests/strategies/test_titan.py explains.
"""

from __future__ import annotations

import pytest
import torch

from tests.strategies import titan_models
from tests.strategies.titan_models import TP_PLAN, lm_loss, token_data
from tests.strategies.titan_sp_workers import ACCUMULATE, BATCH, LLAMA_SP, MAX_NORM, STEPS, TITAN_SP, sp_checks
from tests.strategies.titan_workers import build
from tests.support import shared_job
from trainloop import spawn

AOT = {"backend": "aot_eager"}
TP2 = {"strategy": "fsdp", "dp_shard": 2, "tp": 2}
TP_ALONE = {"strategy": "fsdp", "dp_shard": 1, "tp": 2}
LOSS = {"loss_parallel": True}
AC = {"activation_checkpointing": "blocks"}
COMPILE = {"compile": "blocks", "compile_options": AOT}
SELECTIVE = {"activation_checkpointing": "selective"}

FOUR = {
    "sp": (TP2 | {"tp_plan": TITAN_SP}, "titan"),
    "tp_loss": (TP2 | LOSS | {"tp_plan": TP_PLAN}, "titan"),
    "sp_loss": (TP2 | LOSS | {"tp_plan": TITAN_SP}, "titan"),
    "sp_loss_ac": (TP2 | LOSS | AC | {"tp_plan": TITAN_SP}, "titan"),
    "sp_loss_compile": (TP2 | LOSS | COMPILE | {"tp_plan": TITAN_SP}, "titan"),
    "sp_loss_selective_compile": (TP2 | LOSS | SELECTIVE | COMPILE | {"tp_plan": TITAN_SP}, "titan"),
    "llama_sp_loss": (TP2 | LOSS | {"tp_plan": LLAMA_SP}, "llama"),
    "llama_sp_loss_ac": (TP2 | LOSS | AC | {"tp_plan": LLAMA_SP}, "llama"),
    "llama_sp_loss_compile": (TP2 | LOSS | COMPILE | {"tp_plan": LLAMA_SP}, "llama"),
    # fp8 with loss parallelism, against one process in fp8 (SGD), as tests/strategies/test_titan.py does
    "fp8_tp_loss": (TP2 | LOSS | {"tp_plan": TP_PLAN, "precision": "fp8"}, "titan", {"sgd": True}),
    # refused before anything is sharded
    "fp8_sp": (TP2 | {"tp_plan": TITAN_SP, "precision": "fp8"}, "titan"),
    "loss_without_head": (TP2 | LOSS | {"tp_plan": {k: v for k, v in TP_PLAN.items() if k != "output"}}, "titan"),
}
TWO = {
    "sp": (TP_ALONE | {"tp_plan": TITAN_SP}, "titan"),
    "sp_loss": (TP_ALONE | LOSS | {"tp_plan": TITAN_SP}, "titan"),
    "llama_sp_loss": (TP_ALONE | LOSS | {"tp_plan": LLAMA_SP}, "llama"),
}
REFUSED = {"fp8_sp", "loss_without_head"}
FP8 = {"fp8_tp_loss"}
FP8_ATOL = 1e-3  # float8 scales follow each micro-batch's amax (tests/strategies/test_titan.py)


SHARED = shared_job.Call(sp_checks, n=4, args=lambda _: (FOUR,))


@pytest.fixture(scope="module")
def four(request) -> dict:
    return SHARED.result(request)


@pytest.fixture(scope="module")
def two() -> dict:
    return spawn.run(sp_checks, TWO, n=2)


def one_process(kind: str, data_parallel: int) -> dict[str, torch.Tensor]:
    """Plain PyTorch: AdamW, clip_grad_norm_, one step per global batch of the 2-step window."""
    model, dataset = build(kind), token_data()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    big_batch = BATCH * ACCUMULATE * data_parallel
    for step in range(STEPS):
        inputs, targets = dataset[step * big_batch:(step + 1) * big_batch]
        lm_loss(model, inputs, targets).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        assert norm > MAX_NORM  # the clipping acts
        optimizer.step()
        optimizer.zero_grad()
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_exact(found: dict, expected: dict, atol: float = 2e-5) -> None:
    titan_models.assert_exact(found, expected, steps=STEPS, atol=atol)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(set(FOUR) - REFUSED - FP8))
def test_dp2_tp2_equals_one_process_over_the_global_batch(four, case):
    assert_exact(four[case], one_process(FOUR[case][1], data_parallel=2))


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(TWO))
def test_tp_alone_equals_one_process(two, case):
    assert_exact(two[case], one_process(TWO[case][1], data_parallel=1))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_loss_parallel_keeps_the_logits_sharded_over_the_vocabulary(four, two):
    """The head's output is a DTensor sharded on its last dimension; the loss a replicated DTensor."""
    for found in (four["tp_loss"], four["sp_loss"], four["llama_sp_loss"], two["sp_loss"]):
        assert found["logits"] == "DTensor[Shard(dim=2)]"
        assert found["loss"] == "DTensor"
    assert four["sp"]["logits"] == "Tensor[]"  # without it, the head gathers them


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fp8_with_sequence_parallelism_between_blocks_is_refused(four):
    message = four["fp8_sp"]["refused"]
    assert "precision='fp8' with tp_plan's 'embedding_rowwise_sequence' style ('tok_embeddings')" in message
    assert "Use precision='bf16' with sequence parallelism" in message


@pytest.mark.multiprocess
@pytest.mark.slow
def test_loss_parallel_without_a_gathered_head_is_refused(four):
    message = four["loss_without_head"]["refused"]
    assert "loss_parallel=True keeps the output head's logits sharded" in message
    assert "no module of Transformer has 'colwise_rep' or 'colwise_gather_output'" in message
    assert "{'output': 'colwise_rep'}" in message


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fp8_with_loss_parallelism_follows_one_process_in_fp8(four):
    from tests.strategies.titan_sp_workers import sp_run

    one = sp_run({"precision": "fp8", "accumulate": 2 * ACCUMULATE}, "titan", {"sgd": True})  # 4 micro-batches of 2
    assert four["fp8_tp_loss"]["logits"] == "DTensor[Shard(dim=2)]"
    assert_exact(four["fp8_tp_loss"], one["weights"], atol=FP8_ATOL)


def test_sequence_parallelism_between_blocks_with_ac_and_compile_is_refused_at_init():
    """torch's compiled checkpoint wrapper fails on the blocks' DTensor inputs (see refuse_combinations)."""
    import trainloop as tl

    settings = {"strategy": "fsdp", "tp": 2, "tp_plan": TITAN_SP} | AC | COMPILE
    with pytest.raises(tl.SettingError) as refused:
        tl.init(**settings)
    message = str(refused.value)
    assert ("tp_plan's sequence parallelism between blocks ('embedding_rowwise_sequence') with "
            "activation_checkpointing='blocks' and compile='blocks' is not supported") in message
    assert "Use activation_checkpointing='selective'" in message
    # Each alone, or the stream between blocks whole, passes init's checks (a world of one: the
    # mesh's own check is what refuses then).
    for other in (AC, COMPILE, SELECTIVE | COMPILE):
        with pytest.raises(ValueError, match="does not divide the world size 1"):
            tl.init(strategy="fsdp", tp=2, tp_plan=TITAN_SP, **other)
    with pytest.raises(ValueError, match="does not divide the world size 1"):
        tl.init(strategy="fsdp", tp=2, tp_plan=TP_PLAN, **AC, **COMPILE)


def test_loss_parallel_without_tensor_parallelism_is_refused():
    import trainloop as tl

    with pytest.raises(tl.SettingError, match=r"loss_parallel=True .* but tp=1: set tp > 1"):
        tl.Config(loss_parallel=True)


def test_loss_parallel_context_is_a_no_op_without_the_setting_and_re_entrant_with_it():
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel.loss import customized_loss_ops

    import trainloop as tl

    handlers = DTensor._op_dispatcher._custom_op_handlers
    state = tl.init()
    try:
        with tl.loss_parallel(state):
            assert not any(op in handlers for op in customized_loss_ops)
            F.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]))
    finally:
        tl.finish(state)
    with tl.loss_parallel():
        with tl.loss_parallel():
            assert all(op in handlers for op in customized_loss_ops)
        assert all(op in handlers for op in customized_loss_ops)  # the inner exit left them
    assert not any(op in handlers for op in customized_loss_ops)
    with pytest.raises(RuntimeError, match="inside"), tl.loss_parallel():
        raise RuntimeError("inside")
    assert not any(op in handlers for op in customized_loss_ops)  # restored after an error
