"""The strategies on real processes (gloo, CPU): DDP's own options, and the scale features.

One `spawn.run(two_rank_checks, n=2)` runs every 2-process check and one
`spawn.run(four_rank_checks, n=4)` every 4-process one (tests/multiprocess/scale_workers.py); the references
are plain PyTorch loops on one process, run here.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

import trainloop as tl
from tests.multiprocess.scale_workers import (
    MESH_SAMPLES,
    MeshModel,
    Rotary,
    RotaryModel,
    WithSpare,
    four_rank_checks,
    two_rank_checks,
)
from tests.support.models import BlockModel
from tests.support.reference import big_batch_reference, epoch_order, mse, regression_data, tiny_model
from trainloop import RunState, spawn

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    return spawn.run(two_rank_checks, str(tmp_path_factory.mktemp("scale")), n=2)


def big_batch(model: torch.nn.Module, epochs: int = 2, size: int = 16) -> dict[str, torch.Tensor]:
    """What `scale_workers.trained` must equal: one process, the 16-sample batch (8 without accumulation)."""
    big_batch_reference(model, torch.optim.AdamW(model.parameters(), lr=1e-2), regression_data(40),
                        big_batch=size, epochs=epochs, seed=3, shuffle=True)
    return model.state_dict()


def assert_weights(found: list | dict, expected: dict, atol: float = 1e-6) -> None:
    assert found.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(found[name], value, atol=atol, rtol=0, msg=f"{name} differs")


# -- DDP's own options ----------------------------------------------------------------------------


def test_ddp_options_reach_distributed_data_parallel(job):
    assert job["ddp_attributes"] == (True, True, int(1.5 * 1024 * 1024), False)
    # The defaults are torch's own, its small first bucket included.
    assert job["ddp_default_attributes"] == (False, False, True, False)


@pytest.mark.parametrize("name", ["bucket_view", "unused"])
def test_ddp_options_keep_accumulation_exact(job, name):
    assert job[f"{name}_steps"] == 6
    assert_weights(job[f"{name}_weights"], big_batch(tiny_model()))


def test_ddp_static_graph_is_exact_and_refused_with_accumulation(job):
    assert job["static_graph_steps"] == 10
    assert_weights(job["static_graph_weights"], big_batch(tiny_model(), size=8))
    assert "pytorch/pytorch#143580" in job["static_graph_with_accumulation"]


def test_an_unused_parameter_needs_find_unused_parameters(job):
    assert "find_unused_parameters" in job["unused_without_setting"]
    expected = big_batch(WithSpare())
    assert_weights(job["spare_weights"], expected)
    torch.testing.assert_close(expected["spare.weight"], WithSpare().spare.weight.detach(), rtol=0, atol=0)


def test_find_unused_parameters_averages_a_parameter_one_rank_used_with_zeros(job):
    """The documented trap: the gradient of a layer only rank 0 used arrives halved."""
    (grad, on_rank1), local = job["rank0_only_grad"]
    torch.testing.assert_close(grad, local / 2, rtol=0, atol=0)
    assert torch.equal(on_rank1, grad)


def test_ddp_bf16_comm_hook_is_refused_on_gloo(job):
    assert "ddp_comm_hook='bf16' needs the nccl or xccl backend" in job["bf16_hook_on_gloo"]


@pytest.mark.parametrize("hook", ["fp16"])  # bf16: torch's hook runs on nccl only (a GPU machine)
def test_ddp_comm_hook_all_reduces_compressed_gradients(job, hook):
    synced, compressed, exact = job[f"{hook}_hook"]
    for got, rounded in zip(synced, compressed):
        torch.testing.assert_close(got, rounded, rtol=0, atol=0)
    assert any(not torch.equal(got, true) for got, true in zip(synced, exact))  # really rounded
    assert_weights(job[f"{hook}_hook_weights"], big_batch(tiny_model()), atol=2e-2)


def test_ddp_option_values_are_checked():
    with pytest.raises(ValueError, match="ddp_comm_hook must be one of 'none', 'bf16', 'fp16'"):
        tl.init(ddp_comm_hook="powersgd")
    with pytest.raises(ValueError, match="ddp_static_graph must be True or False"):
        tl.init(ddp_static_graph="yes")


# -- meta-device init -----------------------------------------------------------------------------


def whole_built(seed: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = RotaryModel()
    model.load_state_dict(BlockModel(seed=seed).state_dict(), strict=False)  # BlockModel seeds itself
    return model


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_a_meta_model_is_initialised_by_reset_parameters_from_the_seed(job, strategy):
    found = job[f"meta_{strategy}"]
    assert found["was_meta"] and found["optimizer_bound"]
    assert_weights(found["initial"], BlockModel(seed=3).state_dict(), atol=0)
    torch.testing.assert_close(found["inv_freq"], Rotary().inv_freq, rtol=0, atol=0)  # kept real


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_a_meta_model_trains_like_the_model_built_whole(job, strategy):
    assert_weights(job[f"meta_{strategy}"]["trained"], big_batch(whole_built()))


def test_fsdp_materialises_only_this_ranks_shards(job):
    total = sum(p.numel() for p in BlockModel().parameters())
    fsdp, ddp = job["meta_fsdp"], job["meta_ddp"]
    assert ddp["local_numel"] == total
    # Every parameter is split in two (the 3-row head unevenly): about half each, never the whole.
    assert fsdp["local_numel"] <= total // 2 + 20
    assert fsdp["local_storage"] <= 4 * (total // 2 + 20)


def test_meta_buffers_are_recomputed_by_reset_parameters_or_refused_by_name(job):
    torch.testing.assert_close(job["meta_buffers_recompute_True"], Rotary().inv_freq, rtol=0, atol=0)
    refused = job["meta_buffers_recompute_False"]
    assert "rotary.inv_freq" in refused and "reset_parameters()" in refused


def test_a_meta_model_on_one_process_is_materialised_whole():
    from trainloop.bigmodel import empty_weights

    state = tl.init(seed=3)
    with empty_weights():
        model = BlockModel()
    state, model = tl.prepare(state, model)
    assert_weights(tl.unwrap(model).state_dict(), BlockModel(seed=3).state_dict(), atol=0)


def test_an_optimizer_left_on_meta_parameters_is_refused():
    from trainloop.bigmodel import empty_weights

    state = tl.init(seed=3)
    with empty_weights():
        model = BlockModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state, model = tl.prepare(state, model)
    with pytest.raises(ValueError, match="still on the meta device: pass the optimizer to the same tl.prepare"):
        tl.prepare(state, optimizer)


# -- activation checkpointing ---------------------------------------------------------------------


def test_activation_checkpointing_wraps_each_block_and_keeps_fewer_tensors(job):
    assert (job["ac_blocks_wrappers"], job["ac_none_wrappers"]) == (4, 0)
    assert job["ac_blocks_saved"] < job["ac_none_saved"]


def test_fsdp_with_activation_checkpointing_equals_the_big_batch(job):
    assert job["ac_steps"] == 6
    assert_weights(job["ac_weights"], big_batch(BlockModel(seed=3, depth=4)), atol=1e-5)


def test_fsdp_with_checkpointed_compiled_blocks_equals_the_big_batch(job):
    assert_weights(job["ac_compiled_weights"], big_batch(BlockModel(seed=3, depth=4)), atol=1e-5)


def test_activation_checkpointing_needs_blocks():
    state = tl.init(activation_checkpointing="blocks")
    with pytest.raises(ValueError, match="activation_checkpointing='blocks' found no blocks in Sequential"):
        tl.prepare(state, tiny_model())


# -- compile="blocks" -----------------------------------------------------------------------------


def test_compile_blocks_compiles_each_block_and_matches_eager():
    """Inductor on CPU: each block compiled, the root left eager; the same numbers as eager."""
    from torch._dynamo.utils import counters

    counters.clear()
    state = tl.init(compile="blocks", seed=3)
    state, model = tl.prepare(state, BlockModel(seed=3))
    reference = BlockModel(seed=3)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    out, expected = model(x), reference(x)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert type(tl.unwrap(model)) is BlockModel  # the root is not compiled
    assert counters["stats"]["unique_graphs"] >= 1  # the blocks are
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    for (name, p), q in zip(tl.unwrap(model).named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-5, msg=name)


def test_compile_setting_takes_blocks_from_the_environment(monkeypatch):
    monkeypatch.setenv("TRAINLOOP_COMPILE", "blocks")
    assert tl.init().config.compile == "blocks"
    monkeypatch.delenv("TRAINLOOP_COMPILE")
    with pytest.raises(ValueError, match="compile must be True, False or 'blocks'"):
        tl.init(compile="regions")


# -- meshes on 4 processes ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four(tmp_path_factory) -> dict:
    return spawn.run(four_rank_checks, str(tmp_path_factory.mktemp("mesh")), n=4)


def mesh_reference(big: int, *, sgd: bool = False, clip: float | None = None, epochs: int = 2, seed: int = 0):
    """One process, the big batch, the same shuffled order; clipping as clip_grad_norm_ does it."""
    model = MeshModel(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1) if sgd else torch.optim.AdamW(model.parameters(), lr=1e-2)
    dataset, norms = regression_data(MESH_SAMPLES), []
    for epoch in range(epochs):
        order = epoch_order(MESH_SAMPLES, seed=3, epoch=epoch, shuffle=True)
        for start in range(0, MESH_SAMPLES, big):
            x, y = (torch.stack(c) for c in zip(*(dataset[i] for i in order[start:start + big].tolist())))
            mse(model, x, y).backward()
            if clip:
                norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
            optimizer.step()
            optimizer.zero_grad()
    return model.state_dict(), norms


@pytest.mark.parametrize(("run", "big"), [("hsdp", 32), ("tp", 16)])
def test_hsdp_and_tensor_parallel_with_accumulation_equal_the_big_batch(four, run, big):
    expected, _ = mesh_reference(big)
    assert four[run]["steps"] == 2 * MESH_SAMPLES // big
    assert_weights(four[run]["weights"], expected, atol=1e-5)


@pytest.mark.parametrize(("run", "big"), [("hsdp_clip", 32), ("tp_clip", 16)])
def test_clipping_under_hsdp_and_tensor_parallel_equals_clipping_the_big_batch(four, run, big):
    expected, norms = mesh_reference(big, sgd=True, clip=0.05)
    assert min(norms) > 0.05  # every step really clipped
    torch.testing.assert_close(four[run]["norms"], norms, rtol=1e-5, atol=1e-6)
    assert_weights(four[run]["weights"], expected, atol=1e-5)


def test_a_meta_model_under_tensor_parallelism_and_fsdp_initialises_its_shards_from_the_seed(four):
    """Built under empty_weights(), TP 2 x dp_shard 2: the seed-3 model, each rank a quarter of it."""
    expected, _ = mesh_reference(16, seed=3)
    assert_weights(four["tp_meta"]["weights"], expected, atol=1e-5)
    total = sum(p.numel() for p in MeshModel().parameters())
    assert four["tp_meta"]["local_numel"] == four["tp"]["local_numel"] < total // 2


def test_loaders_shard_by_the_data_parallel_ranks_only(four):
    """tp=2 x dp_shard=2: ranks 0,1 are one TP group (dp rank 0), ranks 2,3 the other."""
    seen = four["tp"]["seen"]
    assert [dp for dp, _ in seen] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert torch.equal(seen[0][1], seen[1][1]) and torch.equal(seen[2][1], seen[3][1])
    assert not torch.equal(seen[0][1], seen[2][1])
    assert [dp for dp, _ in four["hsdp"]["seen"]] == [(r, 4) for r in range(4)]


def test_gather_under_tensor_parallelism_gathers_each_data_parallel_rank_once(four):
    """Rank 0 gathers (dp rank, rank) from its data-parallel peers: ranks 0 and 2, not all four."""
    assert four["tp"]["gathered"].tolist() == [0, 0, 1, 2]
    assert four["hsdp"]["gathered"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def resume_on_one_process(checkpoint: str, accumulate: int) -> tuple[RunState, dict]:
    """One process, no process group, batch 4: `accumulate` micro-batches make the mesh's global batch."""
    state = tl.init(seed=3, accumulate=accumulate)
    model = MeshModel(seed=1)  # other initial weights: the checkpoint's must replace them
    state, model, optimizer, loader = tl.prepare(
        state, model, torch.optim.AdamW(model.parameters(), lr=1e-2),
        DataLoader(regression_data(MESH_SAMPLES), batch_size=4, shuffle=True))
    state = tl.load(state, checkpoint)
    assert loader.epoch == 1
    for x, y in loader:
        with tl.accumulate(state, model):
            state = tl.backward(state, mse(model, x, y))
        state = tl.step(state, optimizer)
    return state, tl.unwrap(model).state_dict()


def test_a_checkpoint_saved_on_2x2_resumes_on_4x1_and_on_one_process_exactly(four):
    expected, _ = mesh_reference(32)
    assert four["saved_on_2x2"]["steps"] == 2
    assert four["resumed_on_4x1"]["steps"] == 4
    assert_weights(four["resumed_on_4x1"]["weights"], expected, atol=1e-5)
    state, found = resume_on_one_process(four["checkpoint"], accumulate=8)
    assert state.step == 4
    assert_weights(found, expected, atol=1e-5)


def test_a_tensor_parallel_checkpoint_resumes_on_one_process_and_exports_whole(four):
    from safetensors.torch import load_file

    expected, _ = mesh_reference(16)
    state, found = resume_on_one_process(four["tp_checkpoint"], accumulate=4)
    assert (four["saved_under_tp"]["steps"], state.step) == (4, 8)
    assert_weights(found, expected, atol=1e-5)
    assert_weights(load_file(four["tp_export"]), four["tp"]["weights"], atol=0)


def test_mesh_settings_are_checked_against_the_strategy_and_world_size():
    with pytest.raises(ValueError, match="dp_replicate=1 and tp=2 need strategy='fsdp'"):
        tl.init(tp=2)
    with pytest.raises(ValueError, match="dp_replicate=2 x dp_shard=1 x tp=1 = 2, but the world size is 1"):
        tl.init(strategy="fsdp", dp_replicate=2, dp_shard=1)


def test_fsdp_with_activation_checkpointing_resumes_from_sharded_checkpoints(job):
    assert job["ac_resumed_steps"] == 6
    assert_weights(job["ac_resumed_weights"], big_batch(BlockModel(seed=3, depth=4)), atol=1e-5)


def test_every_strategy_implements_the_whole_protocol():
    from trainloop.strategies.base import Strategy
    from trainloop.strategies.ddp import DataParallel
    from trainloop.strategies.fsdp import FullyShard
    from trainloop.strategies.local import Local

    members = {name for name in vars(Strategy) if not name.startswith("_")} | set(Strategy.__annotations__)
    assert {"wrap", "no_sync", "data_parallel", "data_parallel_group", "grad_norm", "scale_grads_", "clip_grads_",
            "bind_optimizer", "sharded", "name"} <= members
    for strategy in (Local, DataParallel, FullyShard):
        missing = [name for name in members if not hasattr(strategy, name)]
        assert missing == [], f"{strategy.__name__} lacks {missing}"
