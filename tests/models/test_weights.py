"""`tl.load_weights`: safetensors checkpoints into prepared, sharded, plain and meta models.

One `spawn.run` of `weights_checks` on 2 ranks loads a file written here from a whole model
(and the same weights as a Hugging Face sharded directory) into FSDP2, DDP, tensor-parallel and
FSDP2-over-TP models (tests/models/weights_workers.py). One process, meta-device models, tied weights
and the errors run in this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import trainloop as tl
from tests.models.weights_workers import weights_checks
from tests.support.models import BlockModel, probe_input
from trainloop import spawn
from trainloop.models import safetensors_file
from trainloop.models.hf import INDEX

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def write_checkpoints(directory: Path, state_dict: dict[str, torch.Tensor]) -> tuple[Path, Path]:
    """One whole file, and the same tensors as a Hugging Face sharded directory with its index."""
    state_dict = {name: tensor.contiguous() for name, tensor in state_dict.items()}
    whole = directory / "whole.safetensors"
    save_file(state_dict, whole)
    sharded = directory / "hf"
    sharded.mkdir()
    names = sorted(state_dict)
    halves = (names[: len(names) // 2], names[len(names) // 2:])
    weight_map = {}
    for file, part in zip(SHARDS, halves):
        save_file({name: state_dict[name] for name in part}, sharded / file)
        weight_map.update(dict.fromkeys(part, file))
    (sharded / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return whole, sharded


@pytest.fixture
def checkpoints(tmp_path) -> tuple[Path, Path]:
    return write_checkpoints(tmp_path, BlockModel(seed=1).state_dict())


def _equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    weights = tl.unwrap(model).state_dict()
    return weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)


# -- one process -----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["file", "index directory", "single-file directory"])
def test_one_process_loads_bit_for_bit(checkpoints, tmp_path, which):
    whole, sharded = checkpoints
    if which == "single-file directory":
        (tmp_path / "single").mkdir()
        whole.rename(tmp_path / "single" / "model.safetensors")
        path = tmp_path / "single"
    else:
        path = whole if which == "file" else sharded
    state = tl.init()
    state, model = tl.prepare(state, BlockModel(seed=0))
    assert tl.load_weights(state, model, path) == ([], [])
    assert _equal(model, BlockModel(seed=1).state_dict())


def test_values_converted_through_a_small_buffer_still_load_bit_for_bit(tmp_path, monkeypatch):
    # A value whose dtype changes on the way in goes through a CPU buffer of at most CHUNK bytes,
    # a few rows at a time: with a one-byte buffer every row is read and converted on its own.
    monkeypatch.setattr(safetensors_file, "CHUNK", 1)
    source = BlockModel(seed=1)
    save_file({k: v.to(torch.bfloat16) for k, v in source.state_dict().items()}, tmp_path / "bf16.safetensors")
    model = BlockModel(seed=0)
    tl.load_weights(tl.init(), model, tmp_path / "bf16.safetensors")
    assert _equal(model, {k: v.to(torch.bfloat16).float() for k, v in source.state_dict().items()})


def test_a_meta_model_is_materialised_and_its_optimizer_still_trains(checkpoints):
    whole, _ = checkpoints
    state = tl.init()
    with tl.empty_weights():
        model = BlockModel(seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    head = model.head.weight
    tl.load_weights(state, model, whole)
    assert not any(t.is_meta for t in model.state_dict().values())
    assert model.head.weight is head  # the same object: the optimizer holds it
    assert _equal(model, BlockModel(seed=1).state_dict())
    state, model, optimizer = tl.prepare(state, model, optimizer)
    with tl.accumulate(state, model):
        state = tl.backward(state, model(probe_input()).square().mean())
    tl.step(state, optimizer)
    assert not torch.equal(model.head.weight, load_file(whole)["head.weight"])
    assert torch.equal(load_file(whole)["head.weight"], BlockModel(seed=1).head.weight)  # the file is untouched


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_tied_weights_load_from_either_name_and_stay_tied(tmp_path):
    source = Tied()
    save_file({"embed.weight": source.embed.weight.detach().clone()}, tmp_path / "tied.safetensors")
    state = tl.init()
    with tl.empty_weights():
        model = Tied()
    assert tl.load_weights(state, model, tmp_path / "tied.safetensors") == ([], [])
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.head.weight, source.embed.weight)


def test_values_take_the_models_dtype(tmp_path):
    source = BlockModel(seed=1)
    save_file({k: v.to(torch.bfloat16) for k, v in source.state_dict().items()}, tmp_path / "bf16.safetensors")
    state = tl.init()
    model = BlockModel(seed=0)
    tl.load_weights(state, model, tmp_path / "bf16.safetensors")
    assert model.head.weight.dtype == torch.float32
    assert torch.equal(model.head.weight, source.head.weight.to(torch.bfloat16).float())  # bf16 -> fp32 is exact


# -- errors: raised before anything is loaded ---------------------------------------------------


def _refused(path: Path, match: str, model: nn.Module | None = None, **options) -> nn.Module:
    model = model if model is not None else BlockModel(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        tl.load_weights(tl.init(), model, path, **options)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "a refused load changed the model"
    return model


def test_missing_tensors_are_named(tmp_path):
    weights = BlockModel(seed=1).state_dict()
    del weights["head.bias"], weights["blocks.1.linear.weight"]
    save_file(weights, tmp_path / "partial.safetensors")
    _refused(tmp_path / "partial.safetensors", r"lacks: blocks\.1\.linear\.weight, head\.bias")
    model = BlockModel(seed=0)
    result = tl.load_weights(tl.init(), model, tmp_path / "partial.safetensors", strict=False)
    assert sorted(result.missing_keys) == ["blocks.1.linear.weight", "head.bias"] and result.unexpected_keys == []
    assert torch.equal(model.head.bias, BlockModel(seed=0).head.bias)  # left as it was
    assert torch.equal(model.head.weight, weights["head.weight"])


def test_unexpected_tensors_are_named(tmp_path):
    weights = {**BlockModel(seed=1).state_dict(), "lm_head.weight": torch.zeros(2)}
    save_file(weights, tmp_path / "extra.safetensors")
    _refused(tmp_path / "extra.safetensors", r"the checkpoint has tensor\(s\) the model lacks: lm_head\.weight")
    result = tl.load_weights(tl.init(), BlockModel(seed=0), tmp_path / "extra.safetensors", strict=False)
    assert result == ([], ["lm_head.weight"])


def test_shape_and_dtype_kind_mismatches_are_named(tmp_path):
    weights = BlockModel(seed=1).state_dict()
    weights["head.weight"] = torch.zeros(4, 8)
    weights["head.bias"] = torch.zeros(3, dtype=torch.int64)
    save_file(weights, tmp_path / "bad.safetensors")
    _refused(tmp_path / "bad.safetensors",
             r"head\.weight: checkpoint shape \(4, 8\), model shape \(3, 8\); head\.bias: checkpoint dtype I64")


def test_a_missing_tensor_cannot_stay_on_meta(tmp_path):
    weights = BlockModel(seed=1).state_dict()
    del weights["head.bias"]
    save_file(weights, tmp_path / "partial.safetensors")
    with tl.empty_weights():
        model = BlockModel(seed=0)
    with pytest.raises(ValueError, match="head.bias: not in the checkpoint, and still on the meta device"):
        tl.load_weights(tl.init(), model, tmp_path / "partial.safetensors", strict=False)
    assert model.head.weight.is_meta  # nothing was loaded


def test_paths_that_are_no_checkpoint(tmp_path, checkpoints):
    _, sharded = checkpoints
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors.index.json nor model.safetensors"):
        tl.load_weights(tl.init(), BlockModel(), tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no safetensors checkpoint"):
        tl.load_weights(tl.init(), BlockModel(), tmp_path / "absent.safetensors")
    (sharded / SHARDS[1]).unlink()
    with pytest.raises(FileNotFoundError, match=f"names file\\(s\\) that do not exist: .*{SHARDS[1]}"):
        tl.load_weights(tl.init(), BlockModel(), sharded)


@pytest.mark.slow  # a fresh interpreter
def test_import_trainloop_stays_light():
    code = ("import sys, trainloop; print(sorted(m for m in sys.modules "
            "if m.startswith(('safetensors', 'trainloop.bigmodel', 'trainloop.models.weights'))))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


# -- two ranks -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    whole, sharded = write_checkpoints(tmp_path_factory.mktemp("weights"), BlockModel(seed=1).state_dict())
    return spawn.run(weights_checks, str(whole), str(sharded), n=2)["ranks"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", ["fsdp", "fsdp_index", "ddp", "tp", "fsdp_tp"])
def test_every_strategy_loads_the_file_bit_for_bit(two_ranks, case):
    for rank, report in enumerate(two_ranks):
        assert report[case]["equal"], (rank, case)
        # FSDP and DDP compute exactly what the file's model computes; TP sums in another order.
        assert report[case]["output_error"] <= (1e-6 if "tp" in case else 0.0), (rank, case)


@pytest.mark.multiprocess
def test_fsdp_ranks_hold_only_their_shards(two_ranks):
    # head.weight has 3 rows over 2 ranks: torch's chunking gives rank 0 two, rank 1 one.
    assert [r["fsdp"]["local_shapes"]["head.weight"] for r in two_ranks] == [[2, 8], [1, 8]]
    assert [r["fsdp"]["local_shapes"]["embed.weight"] for r in two_ranks] == [[4, 6], [4, 6]]
    assert two_ranks[0]["fsdp"]["placements"] == ["(Shard(dim=0),)"]


@pytest.mark.multiprocess
def test_the_optimizer_trains_the_loaded_shards(two_ranks):
    assert two_ranks[0]["fsdp"]["result"] == [[], []]
    assert all(r["fsdp"]["trains"] for r in two_ranks)


@pytest.mark.multiprocess
def test_strided_shards_of_fsdp_over_tp_are_loaded(two_ranks):
    assert "(_StridedShard(dim=0, sf=2), Shard(dim=0))" in two_ranks[0]["fsdp_tp"]["placements"]
