"""Big-model inference: build on meta, place within budgets, stream weights in, pipeline across ranks.

The promise under test: a model bigger than the memory it is given still runs, and its outputs
equal the fully loaded model's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

import trainloop
import trainloop.spawn
from tests.support.processes import child_env
from tests.support.tiny_lm import Block, TinyLM
from trainloop.bigmodel import device_map, dispatch, empty_weights, pipeline


def nbytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each tensor once (tied weights included)."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def reference(tmp_path):
    """A seeded TinyLM, its safetensors checkpoint, an input and the fully loaded model's output."""
    torch.manual_seed(0)
    model = TinyLM().eval()
    save_model(model, str(tmp_path / "model.safetensors"))  # stores the tied weight once
    ids = torch.randint(0, 64, (4, 8))
    with torch.no_grad():
        expected = model(ids)
    return model, tmp_path / "model.safetensors", ids, expected


BLOCK = nbytes(Block(32))  # 33,664 bytes
EMBED = 64 * 32 * 4
POSITION = 8 * 4


# -- empty_weights ----------------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_empty_weights_builds_a_400mb_model_without_memory_for_its_parameters():
    before = current_rss()
    with empty_weights():
        model = nn.Sequential(*(nn.Linear(4096, 4096) for _ in range(6)), nn.BatchNorm1d(4096))
    grown = current_rss() - before
    parameter_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert parameter_bytes > 400e6
    assert all(p.is_meta for p in model.parameters())
    assert grown < 32 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB for a meta model"
    assert model[6].running_mean.device.type == "cpu"  # buffers stay real by default


def test_empty_weights_include_buffers_puts_buffers_on_meta_too():
    with empty_weights(include_buffers=True):
        model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_empty_weights_keeps_tied_weights_tied():
    with empty_weights():
        model = TinyLM()
    assert model.head.weight is model.embed.weight


def test_empty_weights_restores_module_construction_after_an_error():
    register_parameter = nn.Module.register_parameter
    with pytest.raises(RuntimeError, match="while building"), empty_weights():
        raise RuntimeError("failed while building")
    assert nn.Module.register_parameter is register_parameter
    assert nn.Linear(2, 2).weight.device.type == "cpu"


# -- device_map -------------------------------------------------------------------------------


def test_device_map_fills_cpu_then_disk_in_model_order_keeping_no_split_blocks_whole():
    with empty_weights():
        model = TinyLM()
    budget = {"cpu": POSITION + EMBED + 2 * BLOCK + 100, "disk": "1GB"}
    expected = {"": "cpu", "embed": "cpu", "layers.0": "cpu", "layers.1": "cpu",
                "layers.2": "disk", "layers.3": "disk", "norm": "disk", "head": "disk"}
    assert device_map(model, max_memory=budget, no_split=[Block]) == expected
    assert device_map(model, max_memory=budget, no_split=["Block"]) == expected


def test_device_map_splits_a_block_that_does_not_fit_when_allowed():
    with empty_weights():
        model = TinyLM()
    room_for_norm_and_fc1 = 2 * 32 * 4 + nbytes(nn.Linear(32, 128))
    placement = device_map(model, max_memory={"cpu": POSITION + EMBED + 2 * BLOCK + room_for_norm_and_fc1,
                                              "disk": "1GB"})
    assert placement["layers.1"] == "cpu"
    assert (placement["layers.2.norm"], placement["layers.2.fc1"], placement["layers.2.fc2"]) == ("cpu", "cpu", "disk")
    assert "layers.2" not in placement


def test_device_map_counts_a_tied_weight_once():
    with empty_weights():
        model = TinyLM()
    total = nbytes(model)  # the head's weight is the embedding's: counted once
    assert device_map(model, max_memory={"cpu": total}) == {"": "cpu"}
    assert device_map(model, max_memory={"cpu": total - 1, "disk": "1GB"}) != {"": "cpu"}


def test_device_map_sizes_weights_as_cast_to_dtype():
    with empty_weights():
        model = TinyLM()
    half = (nbytes(model) - POSITION) // 2 + POSITION  # float16 weights, the float32 buffer as is
    assert device_map(model, max_memory={"cpu": half}, dtype=torch.float16) == {"": "cpu"}
    assert device_map(model, max_memory={"cpu": half, "disk": "1GB"})["layers.3"] == "disk"


def test_device_map_budgets_accept_bytes_and_unit_strings():
    with empty_weights():
        model = TinyLM()
    maps = [device_map(model, max_memory={"cpu": budget, "disk": "1 TB"}, no_split=[Block])
            for budget in (65536, "64KiB", "65.536kB", "0.0625 MiB")]
    assert all(placement == maps[0] for placement in maps)
    assert "disk" in maps[0].values()


def test_device_map_auto_reads_free_memory():
    with empty_weights():
        model = TinyLM()
    assert device_map(model) == {"": "cpu"}  # a few KB fit in the free RAM of any machine


# -- dispatch ---------------------------------------------------------------------------------


def test_dispatch_across_cpu_and_disk_gives_the_full_models_outputs(reference):
    _, checkpoint, ids, expected = reference
    with empty_weights():
        model = TinyLM()
    placement = device_map(model, max_memory={"cpu": POSITION + EMBED + 2 * BLOCK, "disk": "1GB"},
                           no_split=[Block])
    assert {"cpu", "disk"} <= set(placement.values())
    dispatch(model, checkpoint, placement)
    with torch.no_grad():
        first, second = model(ids), model(ids)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    assert model.head.weight is model.embed.weight
    assert model.layers[0].fc1.weight.device.type == "cpu"
    assert model.layers[3].fc1.weight.is_meta  # streamed in for its forward, released after


def test_dispatch_reads_a_sharded_safetensors_checkpoint(reference, tmp_path):
    full, _, ids, expected = reference
    state_dict = {k: v for k, v in full.state_dict().items() if k != "head.weight"}  # tied: saved once
    keys = sorted(state_dict)
    shards = {"model-1.safetensors": keys[: len(keys) // 2], "model-2.safetensors": keys[len(keys) // 2:]}
    for name, shard_keys in shards.items():
        save_file({k: state_dict[k].contiguous() for k in shard_keys}, tmp_path / name)
    index = {"metadata": {}, "weight_map": {k: name for name, shard_keys in shards.items() for k in shard_keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "model.safetensors").unlink()  # the directory now holds only the sharded form
    with empty_weights():
        model = TinyLM()
    dispatch(model, tmp_path, {"": "cpu", "layers.1": "disk", "layers.3": "disk"})
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected)


def test_dispatch_writes_disk_weights_of_a_torch_checkpoint_to_offload_dir(reference, tmp_path):
    full, _, ids, expected = reference
    torch.save(full.state_dict(), tmp_path / "model.pt")
    with empty_weights():
        model = TinyLM()
    dispatch(model, tmp_path / "model.pt", {"": "cpu", "layers.2": "disk", "layers.3": "disk"},
             offload_dir=tmp_path / "offload")
    assert sorted(p.name for p in (tmp_path / "offload").iterdir()) == ["layers.2.safetensors", "layers.3.safetensors"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected)


def test_dispatch_renames_checkpoint_keys_with_key_map(reference, tmp_path):
    full, _, ids, expected = reference
    prefixed = {f"decoder.{key}": value.contiguous() for key, value in full.state_dict().items() if key != "head.weight"}
    save_file(prefixed, tmp_path / "prefixed.safetensors")
    for key_map in ({r"^decoder\.": ""}, lambda key: key.removeprefix("decoder.")):
        with empty_weights():
            model = TinyLM()
        dispatch(model, tmp_path / "prefixed.safetensors", {"": "cpu", "layers.3": "disk"}, key_map=key_map)
        with torch.no_grad():
            torch.testing.assert_close(model(ids), expected)
    with empty_weights():
        model = TinyLM()
    with pytest.raises(ValueError, match=r"keys look like decoder\.embed\.weight.*pass key_map="):
        dispatch(model, tmp_path / "prefixed.safetensors", {"": "cpu"})
    skip_layer_3 = lambda key: None if key.startswith("decoder.layers.3.") else key.removeprefix("decoder.")  # noqa: E731
    with pytest.raises(ValueError, match=r"missing 6 of the model's tensors: layers\.3\."):
        dispatch(model, tmp_path / "prefixed.safetensors", {"": "cpu"}, key_map=skip_layer_3)
    with pytest.raises(ValueError, match=r"maps two checkpoint keys to 'embed\.weight'"):
        dispatch(model, tmp_path / "prefixed.safetensors", {"": "cpu"}, key_map=lambda key: "embed.weight")
    with pytest.raises(TypeError, match="key_map must be a callable"):
        dispatch(model, tmp_path / "prefixed.safetensors", {"": "cpu"}, key_map=["decoder."])


def test_dispatch_casts_weights_to_dtype(reference):
    full, checkpoint, ids, _ = reference
    with empty_weights():
        model = TinyLM()
    dispatch(model, checkpoint, {"": "cpu", "layers.3": "disk"}, dtype=torch.float64)
    assert model.layers[0].fc1.weight.dtype == torch.float64
    with torch.no_grad():
        output = model(ids)
        torch.testing.assert_close(output, full.double()(ids))


def test_dispatch_streams_a_module_list_mapped_as_a_whole(reference):
    _, checkpoint, ids, expected = reference
    with empty_weights():
        model = TinyLM()
    dispatch(model, checkpoint, {"": "cpu", "layers": "disk"})  # a ModuleList is never called itself
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected)
    assert all(layer.fc1.weight.is_meta for layer in model.layers)


def test_dispatch_again_replaces_the_earlier_placement(reference):
    _, checkpoint, ids, expected = reference
    with empty_weights():
        model = TinyLM()
    dispatch(model, checkpoint, {"": "cpu", "layers.2": "disk"})
    dispatch(model, checkpoint, {"": "cpu", "layers.0": "disk"})
    assert len(model._forward_pre_hooks) == 1 and not model.layers[2]._forward_pre_hooks
    assert model.layers[2].fc1.weight.device.type == "cpu" and model.layers[0].fc1.weight.is_meta
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected)


def test_dispatch_releases_streamed_weights_when_a_forward_raises(reference):
    _, checkpoint, _, _ = reference
    with empty_weights():
        model = TinyLM()
    dispatch(model, checkpoint, {"": "cpu", "embed": "disk"})
    with pytest.raises(RuntimeError):
        model(torch.zeros(1, 8))  # float ids: the embedding's own forward raises
    assert model.embed.weight.is_meta


# Runs in a fresh process. Its peak is read from VmHWM, not `ru_maxrss`: Linux carries the parent's
# high-water mark across fork and exec into the child's `ru_maxrss`, so a child of this pytest
# process (which just built the 200 MB model) would report pytest's peak. Writing "5" to
# /proc/self/clear_refs resets VmHWM to the current RSS: the baseline, after the imports.
PEAK_RSS_CHILD = """
import json, sys, torch
from safetensors.torch import load_file, save_file
from tests.support.tiny_lm import Block, TinyLM
from trainloop.bigmodel import device_map, dispatch, empty_weights

def status(field):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":"))

checkpoint, budget, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ids = load_file(out + ".in")["ids"]
with empty_weights():
    model = TinyLM(vocab=256, width=1024, depth=6, context=16)
with torch.no_grad():  # page in the kernels' code first: it is not weights
    TinyLM(vocab=256, width=64, depth=1, context=16)(ids)
with open("/proc/self/clear_refs", "w") as clear_refs:
    clear_refs.write("5")
baseline = status("VmRSS")
placement = device_map(model, max_memory={"cpu": budget, "disk": "1TB"}, no_split=[Block])
dispatch(model, checkpoint, placement)
with torch.no_grad():
    logits = model(ids)
peak = status("VmHWM")
save_file({"logits": logits}, out)
print(json.dumps({"baseline": baseline, "peak": peak, "placement": placement}))
"""


@pytest.mark.slow  # a child process
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="reads the peak RSS from /proc")
def test_dispatch_peak_memory_stays_under_budget_plus_one_block(tmp_path):
    torch.manual_seed(0)
    full = TinyLM(vocab=256, width=1024, depth=6, context=16).eval()
    checkpoint = tmp_path / "model.safetensors"
    save_model(full, str(checkpoint))
    ids = torch.randint(0, 256, (4, 16))
    with torch.no_grad():
        expected = full(ids)
    block, size = nbytes(full.layers[0]), nbytes(full)
    del full
    budget = block + 2 * 2**20  # the embedding and one block in RAM, five blocks on disk
    save_file({"ids": ids}, tmp_path / "logits.in")

    child = subprocess.run([sys.executable, "-c", PEAK_RSS_CHILD, str(checkpoint), str(budget), str(tmp_path / "logits")],
                           capture_output=True, text=True, timeout=120, check=False, env=child_env())
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout.splitlines()[-1])
    peak = report["peak"] - report["baseline"]
    print(f"peak {peak / 2**20:.1f} MiB; budget {budget / 2**20:.1f} MiB, block {block / 2**20:.1f} MiB, "
          f"checkpoint {size / 2**20:.1f} MiB")
    assert size > 200e6 and list(report["placement"].values()).count("disk") == 5 + 2  # + norm, head
    activations_and_scratch = 16 * 2**20  # what the kernels allocate to run: not weights
    assert peak <= budget + block + activations_and_scratch, (
        f"peak {peak / 2**20:.0f} MiB over budget {budget / 2**20:.0f} MiB + block {block / 2**20:.0f} MiB")
    assert peak < size / 2  # the measurement means something: far less than the checkpoint
    torch.testing.assert_close(load_file(tmp_path / "logits")["logits"], expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dispatch_runs_cpu_and_disk_blocks_on_the_accelerator(reference):
    _, checkpoint, ids, expected = reference
    with empty_weights():
        model = TinyLM()
    placement = {"": "cuda:0", "layers.1": "cpu", "layers.2": "disk", "layers.3": "disk"}
    dispatch(model, checkpoint, placement)
    with torch.no_grad():
        output = model(ids)  # CPU inputs move to the first device
    assert output.device == torch.device("cuda:0")
    assert model.layers[1].fc1.weight.device.type == "cpu"
    torch.testing.assert_close(output.cpu(), expected)


# -- bad input --------------------------------------------------------------------------------


def test_dispatch_names_the_module_a_device_map_leaves_unplaced(reference):
    _, checkpoint, _, _ = reference
    with empty_weights():
        model = TinyLM()
    with pytest.raises(ValueError, match=r"leaves 2 module\(s\) unplaced: \(the model itself\), norm\."):
        dispatch(model, checkpoint, {"embed": "cpu", "layers": "cpu", "head": "cpu"})


def test_dispatch_names_the_keys_missing_from_the_checkpoint(reference, tmp_path):
    full, _, _, _ = reference
    partial = {k: v for k, v in full.state_dict().items() if not k.startswith("layers.3.")}
    save_file({k: v.contiguous() for k, v in partial.items() if k != "head.weight"}, tmp_path / "partial.safetensors")
    with empty_weights():
        model = TinyLM()
    with pytest.raises(ValueError, match=r"missing 6 of the model's tensors: layers\.3\.norm\.weight"):
        dispatch(model, tmp_path / "partial.safetensors", {"": "cpu"})


def test_dispatch_explains_a_meta_buffer_that_no_checkpoint_has(reference):
    _, checkpoint, _, _ = reference
    with empty_weights(include_buffers=True):
        model = TinyLM()  # its non-persistent `position` buffer is on meta: nothing can restore it
    with pytest.raises(ValueError, match=r"missing 1 .*: position\..*empty_weights\(include_buffers=False\)"):
        dispatch(model, checkpoint, {"": "cpu"})


def test_dispatch_names_tensors_whose_shapes_differ(reference):
    _, checkpoint, _, _ = reference
    with empty_weights():
        model = TinyLM(width=16)
    with pytest.raises(ValueError, match=r"shapes differ.*embed\.weight \[64, 32\] vs \[64, 16\]"):
        dispatch(model, checkpoint, {"": "cpu"})


def test_device_map_says_which_block_is_too_big_for_max_memory_and_how_big():
    with empty_weights():
        model = TinyLM()
    with pytest.raises(ValueError, match=rf"'layers.0' \(Block\) needs {BLOCK:,} bytes.*kept whole by no_split"):
        device_map(model, max_memory={"cpu": BLOCK - 1}, no_split=[Block])


def test_dispatch_refuses_an_offload_dir_it_cannot_write(reference, tmp_path):
    full, _, _, _ = reference
    torch.save(full.state_dict(), tmp_path / "model.pt")
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("")
    with empty_weights():
        model = TinyLM()
    with pytest.raises(ValueError, match="offload_dir .* is not writable"):
        dispatch(model, tmp_path / "model.pt", {"": "cpu", "layers.3": "disk"}, offload_dir=not_a_directory / "sub")
    with pytest.raises(ValueError, match="pass offload_dir="):
        dispatch(model, tmp_path / "model.pt", {"": "cpu", "layers.3": "disk"})


@pytest.mark.parametrize("device", ["gpu", "cuda:99", "meta"])
def test_unknown_device_strings_are_refused(reference, device):
    _, checkpoint, _, _ = reference
    with empty_weights():
        model = TinyLM()
    with pytest.raises(ValueError, match=rf"device_map\['layers.0'\] names device '{device}'"):
        dispatch(model, checkpoint, {"": "cpu", "layers.0": device})
    with pytest.raises(ValueError, match=rf"max_memory names device '{device}'"):
        device_map(model, max_memory={device: "1GB"})


def test_bad_sizes_and_paths_are_refused(reference, tmp_path):
    _, checkpoint, _, _ = reference
    with empty_weights():
        model = TinyLM()
    with pytest.raises(ValueError, match=r"max_memory\['cpu'\] = 'lots' is not a size"):
        device_map(model, max_memory={"cpu": "lots"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dispatch(model, tmp_path / "nowhere.safetensors", {"": "cpu"})
    with pytest.raises(ValueError, match="not a module"):
        dispatch(model, checkpoint, {"": "cpu", "layers.9": "disk"})


# -- pipeline ---------------------------------------------------------------------------------


def run_pipelines(checkpoint: str, ids: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """On each of 2 ranks: pipeline a meta model from the checkpoint (default cuts, output
    broadcast), and a real model (explicit cut, output on the last rank only)."""
    state = trainloop.init()
    with empty_weights():
        meta_model = TinyLM()
    from_checkpoint = pipeline(state, meta_model, (ids,), checkpoint=checkpoint, broadcast=True)(ids)

    real_model = TinyLM()
    load_model(real_model, checkpoint)
    runner = pipeline(state, real_model, (ids,), split_points=["layers.1"], n_microbatches=4)
    assert "forward" not in vars(real_model.layers[1])  # torch's split marker is undone after tracing
    last_only = runner(ids)
    if state.rank == state.world_size - 1:
        torch.testing.assert_close(last_only, expected)
    else:
        assert last_only is None
    trainloop.finish(state)
    return from_checkpoint


@pytest.mark.multiprocess
def test_pipeline_on_two_ranks_gives_the_single_process_outputs(reference):
    _, checkpoint, ids, expected = reference
    output = trainloop.spawn.run(run_pipelines, str(checkpoint), ids, expected, n=2)
    torch.testing.assert_close(output, expected)  # rank 0's copy of the broadcast output


def test_pipeline_refuses_split_points_that_do_not_make_one_stage_per_rank(reference):
    _, _, ids, _ = reference
    state = trainloop.init()
    try:
        with pytest.raises(ValueError, match=r"1 ranks need 0 split point\(s\), got 1"):
            pipeline(state, TinyLM(), (ids,), split_points=["layers.2"])
        with pytest.raises(ValueError, match="does not split into n_microbatches=3"):
            pipeline(state, TinyLM(), (ids,), n_microbatches=3)
    finally:
        trainloop.finish(state)
