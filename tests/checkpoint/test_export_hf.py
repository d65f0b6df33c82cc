"""`tl.export`: one safetensors file (the default) or a Hugging Face directory that `from_pretrained`
loads as it is; `dtype=`, tied weights, `key_map=`, and the refusals. The 2-rank FSDP2 export
(streamed one tensor at a time, rank 0's peak memory measured) is at the end, in one start-up."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, load_model
from torch import nn
from transformers import AutoModelForCausalLM

import trainloop as tl
from tests.checkpoint.export_workers import TitanStyle, disk_full, export_checks, titan_to_hf
from tests.support.hf_models import prompt, tiny_gpt2, tiny_llama
from trainloop import spawn
from trainloop.checkpoint import CheckpointError
from trainloop.models.hf_export import Planned, parse_size, shard_groups


def prepared(model: nn.Module) -> tuple[tl.RunState, nn.Module]:
    state, prepared_model = tl.prepare(tl.init(), model)
    return state, prepared_model


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(prompt()).logits


def test_the_default_export_is_one_file_that_load_model_reads(tmp_path):
    model = tiny_llama(tied=True)
    state, model = prepared(model)
    path = tl.export(state, tmp_path / "model.safetensors")
    assert path == tmp_path / "model.safetensors" and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    stored = load_file(path)
    assert "lm_head.weight" not in stored  # a tied weight once, as safetensors' save_model stores it
    fresh = tiny_llama(seed=5, tied=True)
    load_model(fresh, path)
    for name, tensor in tl.unwrap(model).state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


@pytest.mark.parametrize("tied", [False, True])
def test_an_hf_index_export_is_sharded_and_from_pretrained_gives_the_same_logits(tmp_path, tied):
    model = tiny_llama(tied=tied)
    state, model = prepared(model)
    out = tl.export(state, tmp_path / "hf", hf_index=True, max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == files
    assert all((out / f).stat().st_size <= 20_000 + 4096 or len(load_file(out / f)) == 1 for f in files)
    stored = {name: t for f in files for name, t in load_file(out / f).items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    assert set(stored) == set(index["weight_map"])
    assert ("lm_head.weight" in stored) is not tied  # tied: stored once, as save_pretrained does
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()  # config.json is there: loads as it is
    assert torch.equal(logits(loaded), logits(tl.unwrap(model)))


def test_dtype_casts_floating_tensors_and_the_config_says_so(tmp_path):
    model = tiny_gpt2()
    state, model = prepared(model)
    out = tl.export(state, tmp_path / "hf", hf_index=True, dtype=torch.bfloat16)
    stored = load_file(out / "model-00001-of-00001.safetensors")
    own = tl.unwrap(model).state_dict()
    for name, tensor in stored.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, own[name].to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    assert torch.equal(logits(loaded), logits(tl.unwrap(model).to(torch.bfloat16)))


def test_a_torchtitan_layout_is_renamed_by_a_to_hf_map(tmp_path):
    """torchtitan's names, its adapter's `{}` form (inverted from_hf_map): HF's names in the file."""
    torch.manual_seed(0)
    model = TitanStyle()
    state, model = prepared(model)
    out = tl.export(state, tmp_path / "hf", hf_index=True, key_map=titan_to_hf())
    stored = load_file(out / "model-00001-of-00001.safetensors")
    own = tl.unwrap(model).state_dict()
    assert sorted(stored) == sorted(["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                                     *(f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)),
                                     *(f"model.layers.{i}.mlp.down_proj.weight" for i in range(2))])
    assert torch.equal(stored["model.layers.1.self_attn.q_proj.weight"], own["layers.1.attention.wq.weight"])
    callable_out = tl.export(state, tmp_path / "one.safetensors",
                             key_map=lambda name: None if name.startswith("layers.") else f"x.{name}")
    assert sorted(load_file(callable_out)) == ["x.norm.weight", "x.output.weight", "x.tok_embeddings.weight"]


def permute_for_hf_rope(weight: torch.Tensor, heads: int = 2) -> torch.Tensor:
    """torchtitan's Llama adapter's `_permute` (to_hf): interleaved rotary pairs -> HF's halves."""
    rows, columns = weight.shape
    return weight.view(heads, rows // heads // 2, 2, columns).transpose(1, 2).reshape(rows, columns)


def test_transform_changes_a_tensors_layout_on_the_way_and_must_keep_its_shape(tmp_path):
    state, model = prepared(TitanStyle())
    out = tl.export(state, tmp_path / "hf", hf_index=True, key_map=titan_to_hf(),
                    transform=lambda name, t: permute_for_hf_rope(t) if "q_proj" in name else t)
    stored = load_file(out / "model-00001-of-00001.safetensors")
    own = tl.unwrap(model).state_dict()
    wq = own["layers.0.attention.wq.weight"]
    assert torch.equal(stored["model.layers.0.self_attn.q_proj.weight"], permute_for_hf_rope(wq))
    assert not torch.equal(permute_for_hf_rope(wq), wq)
    assert torch.equal(stored["model.norm.weight"], own["norm.weight"])
    with pytest.raises(CheckpointError, match=r"transform\('lm_head.weight'\) returned \(16, 8\) "
                                              r"torch.float16, not \(16, 8\) torch.float32"):
        tl.export(state, out, hf_index=True, key_map=titan_to_hf(), transform=lambda name, t: t.half())
    assert torch.equal(load_file(out / "model-00001-of-00001.safetensors")["model.layers.0.self_attn.q_proj.weight"],
                       permute_for_hf_rope(wq))  # the failed export left the first


def test_a_key_map_that_misses_a_name_or_renames_two_to_one_is_refused(tmp_path):
    state, _ = prepared(TitanStyle())
    partial = {k: v for k, v in titan_to_hf().items() if "wq" not in k}
    with pytest.raises(ValueError, match=r"no name for 2 tensor\(s\): layers.0.attention.wq.weight, "
                                         r"layers.1.attention.wq.weight"):
        tl.export(state, tmp_path / "hf", hf_index=True, key_map=partial)
    with pytest.raises(ValueError, match="renames two tensors to 'same': 'tok_embeddings.weight' and"):
        tl.export(state, tmp_path / "hf", hf_index=True, key_map=lambda name: "same")
    assert not tmp_path.joinpath("hf").exists() and list(tmp_path.iterdir()) == []


def test_refusals_name_the_problem_and_leave_the_target_as_it_was(tmp_path):
    state, _ = prepared(tiny_llama())
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"holds files an export does not write \(tokenizer.json\)"):
        tl.export(state, tmp_path / "hf", hf_index=True)
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["tokenizer.json"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file: an hf_index=True export writes a directory"):
        tl.export(state, tmp_path / "file", hf_index=True)
    with pytest.raises(CheckpointError, match="is a directory: pass a file's path"):
        tl.export(state, tmp_path / "hf")
    with pytest.raises(ValueError, match="max_shard_size cuts an hf_index=True export"):
        tl.export(state, tmp_path / "m.safetensors", max_shard_size="1GB")
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        tl.export(state, tmp_path / "m.safetensors", dtype=torch.int8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "hf"]  # nothing half-written left


@pytest.mark.parametrize("hf_index", [True, False])
def test_a_failed_write_leaves_the_previous_export_and_no_partial_files(tmp_path, hf_index):
    state, model = prepared(tiny_llama())
    target = tmp_path / ("hf" if hf_index else "model.safetensors")
    shards = {"max_shard_size": "20KB"} if hf_index else {}
    out = tl.export(state, target, hf_index=hf_index, **shards)
    before = sorted(tmp_path.rglob("*"))
    contents = {p: p.read_bytes() for p in before if p.is_file()}
    tl.unwrap(model).model.norm.weight.data += 1  # a new export would differ
    with disk_full(), pytest.raises(CheckpointError, match="export failed on rank 0: .*File too large"):
        tl.export(state, out, hf_index=hf_index, **shards)
    assert sorted(tmp_path.rglob("*")) == before and {p: p.read_bytes() for p in contents} == contents


def test_a_dtype_safetensors_lacks_is_refused_before_anything_is_written(tmp_path):
    state, model = prepared(tiny_llama())
    tl.unwrap(model).register_buffer("phase", torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"safetensors has no dtype for phase \(torch.complex64\)"):
        tl.export(state, tmp_path / "hf", hf_index=True)
    assert list(tmp_path.iterdir()) == []


def test_a_second_export_replaces_the_first_whole(tmp_path):
    state, model = prepared(tiny_llama())
    tl.export(state, tmp_path / "hf", hf_index=True, max_shard_size="20KB")
    out = tl.export(state, tmp_path / "hf", hf_index=True)  # fewer files: no stale shard is left
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json",
                                                    "model-00001-of-00001.safetensors",
                                                    "model.safetensors.index.json"]
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out).eval()), logits(tl.unwrap(model)))


def test_files_are_cut_in_order_and_a_tensor_over_the_limit_gets_a_file_of_its_own():
    sizes = [4, 4, 12, 2, 3, 6]  # float32 elements: 16, 16, 48, 8, 12, 24 bytes
    planned = [Planned(f"t{i}", f"t{i}", torch.float32, (n,)) for i, n in enumerate(sizes)]
    groups = shard_groups(planned, 32)
    assert [[t.name for t in group] for group in groups] == [["t0", "t1"], ["t2"], ["t3", "t4"], ["t5"]]


def test_max_shard_size_reads_as_save_pretrained_does():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size(1024) == 1024
    assert parse_size("2kb") == 2000
    for bad in ("5 parsecs", 0, "-1GB", True):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)


# -- two ranks ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return spawn.run(export_checks, str(tmp_path_factory.mktemp("export")), n=2)


@pytest.mark.multiprocess
def test_an_fsdp2_trained_llama_exports_to_a_directory_from_pretrained_loads(two_ranks):
    checks = two_ranks
    loaded = AutoModelForCausalLM.from_pretrained(checks["llama_dir"]).eval()
    with torch.no_grad():
        assert torch.equal(loaded(prompt()).logits, checks["llama_logits"])  # the trained model's
    assert checks["llama_files"] > 2 and checks["llama_tied_left_out"]


@pytest.mark.multiprocess
def test_a_tensor_parallel_llama_exports_whole_and_from_pretrained_gives_its_logits(two_ranks):
    assert two_ranks["tp_sharded"] == "DTensor"  # the export really gathered TP shards
    loaded = AutoModelForCausalLM.from_pretrained(two_ranks["tp_dir"]).eval()
    with torch.no_grad():  # TP's sharded matmuls sum in another order: equal to fp32 rounding
        torch.testing.assert_close(loaded(prompt()).logits, two_ranks["tp_logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.multiprocess
def test_rank_0_out_of_disk_fails_the_export_on_every_rank_and_keeps_the_previous(two_ranks):
    errors = two_ranks["disk_full_errors"]
    assert len(errors) == 2 and all("export failed on rank 0: " in e and "File too large" in e for e in errors)
    before, after = two_ranks["disk_full_after"]
    assert after == before
    assert two_ranks["disk_full_left"] == ["bf16", "llama"]  # no partial directory left


@pytest.mark.multiprocess
def test_an_fsdp2_export_in_bf16_holds_the_trained_weights_cast(two_ranks):
    checks = two_ranks
    stored = {}
    for file in checks["bf16_files"]:
        stored.update(load_file(file))
    assert sorted(stored) == sorted(checks["trained"])
    for name, tensor in checks["trained"].items():
        assert torch.equal(stored[name], tensor.to(torch.bfloat16)), name


@pytest.mark.multiprocess
def test_an_fsdp2_export_holds_one_tensor_at_a_time_on_rank_0(two_ranks):
    """Rank 0's peak resident memory above its baseline while it exports, against the model's bytes."""
    checks = two_ranks
    print(f"rank 0 export peak above baseline: {checks['peak'] / 2**20:.1f} MiB; model "
          f"{checks['model_bytes'] / 2**20:.1f} MiB, largest tensor {checks['largest'] / 2**20:.1f} MiB, "
          f"old gather-everything export {checks['old_peak'] / 2**20:.1f} MiB")
    assert checks["peak"] < checks["model_bytes"] / 2  # measured: 16 MiB of 64 (4 tensors of 4 MiB)
    assert checks["old_peak"] > checks["model_bytes"] * 0.9  # the measure sees a whole model when there is one
