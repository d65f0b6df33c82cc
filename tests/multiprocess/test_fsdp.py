"""strategy="fsdp" (FSDP2) on CPU with gloo: exactness, sharded checkpoints, export, safety.

One `spawn.run` of `fsdp_checks` on 2 ranks runs every check that needs a live job
(tests/multiprocess/fsdp_workers.py). Resuming across world sizes runs tests/support/scripts/fsdp_resumable.py under
`python -m trainloop.spawn`: killed inside a 2-rank sharded save, resumed on 1 rank, and a 1-rank
checkpoint of that run resumed on 2 ranks. Reference results come from plain PyTorch loops on
one process, run here.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import trainloop as tl
from tests.multiprocess.fsdp_workers import fsdp_checks
from tests.support.models import BlockModel, probe_input
from tests.support.paths import REPO, SCRIPTS
from tests.support.reference import big_batch_reference, epoch_order, mse, regression_data
from trainloop import spawn
from trainloop.checkpoint import CheckpointError, verify
from trainloop.checkpoint.files import file_record as _file_record
from trainloop.checkpoint.manifest import _canonical_hash

pytestmark = pytest.mark.multiprocess

RESUMABLE = SCRIPTS / "fsdp_resumable.py"


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[dict, Path]:
    directory = tmp_path_factory.mktemp("fsdp")
    return spawn.run(fsdp_checks, str(directory), n=2), directory


def run_resumable(nproc: int, checkpoints: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "trainloop.spawn", "-n", str(nproc), str(RESUMABLE),
               str(checkpoints), str(out), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO)


@pytest.fixture(scope="module")
def killed_in_save(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    directory = tmp_path_factory.mktemp("killed")
    done = run_resumable(2, directory / "ckpt", directory / "out.pt", "--kill-in-save", "4")
    return done, directory / "ckpt"


@pytest.fixture(scope="module")
def resumed_on_one_rank(killed_in_save) -> tuple[subprocess.CompletedProcess, dict, Path]:
    _, checkpoints = killed_in_save
    out = checkpoints.parent / "resumed.pt"
    done = run_resumable(1, checkpoints, out)
    assert done.returncode == 0, done.stdout + done.stderr
    return done, torch.load(out, weights_only=True), checkpoints


def assert_weights(weights: dict, expected: dict, atol: float = 1e-6) -> None:
    assert weights.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, atol=atol, rtol=0, msg=f"{name} differs")


# -- training ----------------------------------------------------------------------------------


def test_runs_fsdp_on_two_gloo_ranks(job):
    results, _ = job
    assert results["world_size"] == 2 and results["backend"] == "gloo"


def test_fsdp_with_accumulation_equals_ddp_and_one_process_with_the_big_batch(job):
    results, _ = job
    reference = BlockModel()
    big_batch_reference(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2),
                        regression_data(40), big_batch=16, epochs=2, seed=3, shuffle=True)
    assert results["fsdp_steps"] == results["ddp_steps"] == 6  # windows 2, 2, 1 per epoch
    assert_weights(results["fsdp_weights"], reference.state_dict())
    assert_weights(results["fsdp_weights"], results["ddp_weights"])


def test_fsdp_kept_gathered_and_offloaded_to_cpu_trains_the_same(job):
    results, _ = job
    assert_weights(results["fsdp_options_weights"], results["fsdp_weights"])


def test_gradient_sync_is_off_until_the_windows_last_micro_step(job):
    results, _ = job
    first, last = results["grads_after_micro_steps"]
    assert not any(first)  # kept unreduced inside FSDP: no reduce-scatter yet
    assert all(last) and results["grad_types"] == ["DTensor"]


def test_clip_grad_norm_clips_the_total_norm_over_all_shards(job):
    results, _ = job
    reference = BlockModel()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    dataset, norms = regression_data(40), []
    order = epoch_order(40, seed=3, epoch=0, shuffle=True)
    for start in range(0, 40, 16):
        x, y = (torch.stack(column) for column in zip(*(dataset[i] for i in order[start:start + 16].tolist())))
        mse(reference, x, y).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)))
        optimizer.step()
        optimizer.zero_grad()
    assert results["clip_norms"] == pytest.approx(norms, rel=1e-5)
    assert min(norms) > 0.05  # every step was really clipped
    assert_weights(results["clip_weights"], reference.state_dict())


def test_loss_scale_skips_on_every_rank_when_one_shard_overflows(job):
    results, _ = job
    # Rank 0 (reporting) saw no inf in its own shards: it skipped because rank 1 found one.
    assert results["overflow_skipped"] == (1, 0, 512.0)
    assert results["overflow_weights_unchanged"]
    assert results["clean_step"] == (1, 1)


def test_bf16_computes_in_bf16_and_keeps_fp32_shards(job):
    results, _ = job
    assert results["bf16_param_dtypes"] == ["torch.float32"]
    dtype, output = results["bf16_output"]
    assert dtype == "torch.float32"  # the prepared model hands back fp32 outputs
    fp32 = results["fp32_output"]
    assert not torch.equal(output, fp32)
    torch.testing.assert_close(output, fp32, atol=2e-2, rtol=0)


@pytest.mark.parametrize(("precision", "shard_dtype"), [("fp16", "torch.float32"), ("bf16-true", "torch.bfloat16")])
def test_the_other_precisions_train_under_fsdp(job, precision, shard_dtype):
    results, _ = job
    losses, steps, dtype = results[f"{precision}_training"]
    assert steps == 3 and dtype == shard_dtype  # fp16: no overflow at the default scale here
    assert losses[0] > losses[1] > losses[2]


# -- blocks and optimizers ---------------------------------------------------------------------


def test_blocks_default_to_the_largest_module_list_or_are_named(job):
    results, _ = job
    # The embedding before the blocks and the head after them are units of their own (fsdp_shard_ends).
    assert results["default_blocks"] == ["<root>", "embed", "blocks.0", "blocks.1", "blocks.2", "head"]
    assert results["named_blocks"] == ["<root>", "embed", "blocks.0", "blocks.0.linear", "blocks.1",
                                       "blocks.1.linear", "head"]


def test_a_model_without_blocks_is_sharded_at_the_root_with_a_warning(job):
    results, _ = job
    assert results["root_only"] == ["<root>"]
    assert len(results["root_only_warnings"]) == 1
    assert "only the root is sharded" in results["root_only_warnings"][0]
    assert "init(blocks='MyBlock')" in results["root_only_warnings"][0]


def test_unknown_block_class_names_the_classes_the_model_has(job):
    results, _ = job
    assert results["unknown_block_error"] == (
        "blocks names ['Layer'], but BlockModel has no submodule of that class; its module "
        "classes are ['Block', 'BlockModel', 'Linear', 'ModuleList']")


def test_the_users_optimizer_is_bound_in_place_to_the_shards(job):
    results, _ = job
    assert results["optimizer_same_object"]  # and its scheduler
    assert results["optimizer_holds_the_shards"]
    assert results["optimizer_groups"] == [(0.5, 0.1, 1), (0.001, 0.1, 9)]


def test_optimizers_that_cannot_be_bound_are_refused_clearly(job):
    results, _ = job
    assert "SGD has already taken steps" in results["stepped_optimizer_error"]
    assert "Prepare the optimizer before its first step" in results["stepped_optimizer_error"]
    assert "SGD holds 1 tensor(s) that are not parameters" in results["stray_optimizer_error"]
    assert "pass it to the same tl.prepare call as its model" in results["stray_optimizer_error"]


def test_block_classes_must_be_class_names():
    for name in ("blocks", "fsdp_blocks"):  # the old name means the same
        with pytest.raises(ValueError, match="^blocks must be comma-separated class names"):
            tl.init(strategy="fsdp", **{name: "Block; Head"})


# -- checkpoints -------------------------------------------------------------------------------


def test_a_sharded_checkpoint_holds_every_ranks_shards_and_verifies(job):
    results, directory = job
    assert results["checkpoint_files"] == [".metadata", "__0_0.distcp", "__1_0.distcp", "callbacks.pt",
                                           "manifest.json", "optimizer.pt", "rng.pt", "trainer.json"]
    manifest = verify(directory / "sharded")
    assert manifest["world_size"] == 2 and manifest["strategy"] == "fsdp" and manifest["step"] == 9


def test_a_ddp_run_loads_a_sharded_checkpoint(job):
    results, _ = job
    assert results["ddp_loaded_step"] == 9
    assert_weights(results["ddp_loaded_weights"], results["uninterrupted_weights"], atol=0)


def test_a_rank_out_of_disk_fails_the_sharded_save_everywhere_and_commits_nothing(job):
    results, directory = job
    # Rank 0 reports the failure although its own writes succeeded.
    assert results["disk_full_error"] == (
        f"could not write checkpoint {directory / 'full-disk'}: rank 1: OSError: [Errno 27] File too "
        "large (the previous checkpoints are untouched)")
    assert results["disk_full_left"] == []
    assert "manifest.json" in results["save_after_disk_full"]
    assert verify(directory / "sharded")["step"] == 9


def test_a_save_before_the_first_step_changes_nothing(job):
    results, _ = job
    assert results["optimizer_state_after_early_save"] == 0
    assert results["early_save_trains_the_same"]
    assert results["optimizer_state_after_early_load"] == 0
    assert_weights(results["early_load_weights"], BlockModel().state_dict(), atol=0)


def plain_run(model: torch.nn.Module):
    """The objects the resumable run prepared, on one plain process (strategy auto)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
    loader = DataLoader(regression_data(40), batch_size=4, shuffle=True)
    return tl.prepare(tl.init(), model, optimizer, loader, scheduler)


def test_a_two_rank_sharded_checkpoint_loads_into_one_plain_process(job):
    results, directory = job
    state, model, optimizer, loader, scheduler = plain_run(BlockModel(seed=5))
    state = tl.load(state, directory / "sharded")
    assert state.step == 9 and scheduler.last_epoch == 9 and loader.epoch == 3
    assert_weights(model.state_dict(), results["uninterrupted_weights"], atol=0)
    assert all(s["step"].item() == 9 for s in optimizer.state.values()) and len(optimizer.state) == 10


def test_a_checkpoint_from_a_different_model_lists_the_mismatches(job):
    _, directory = job
    state, *_ = plain_run(BlockModel(width=12))
    with pytest.raises(ValueError, match=r"does not fit this run's models and optimizers: "
                                         r"model\.0\.embed\.weight: checkpoint \(8, 6\), run \(12, 6\); "
                                         r".*and \d+ more"):
        tl.load(state, directory / "sharded")


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def rehash_manifest(checkpoint: Path) -> None:
    """What an attacker who can write the files can do to the manifest too."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"] = {name: _file_record(checkpoint / name) for name in manifest["files"]}
    del manifest["manifest_sha256"]
    manifest["manifest_sha256"] = _canonical_hash(manifest)
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def test_a_planted_pickle_in_dcp_metadata_is_refused_and_never_runs(job, tmp_path):
    _, directory = job
    checkpoint = copy_checkpoint(directory / "sharded", tmp_path / "planted")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (checkpoint / ".metadata").write_bytes(pickle.dumps(Payload()))
    rehash_manifest(checkpoint)
    state, *_ = plain_run(BlockModel())
    with pytest.raises(CheckpointError, match=r"refusing to read \.metadata: it asks for (io|builtins)\.open"):
        tl.load(state, checkpoint)
    assert not marker.exists()


def test_dcp_metadata_that_points_outside_the_verified_files_is_refused(job, tmp_path):
    from trainloop.checkpoint.distcp import _MetadataUnpickler

    _, directory = job
    checkpoint = copy_checkpoint(directory / "sharded", tmp_path / "redirected")
    with open(checkpoint / ".metadata", "rb") as file:
        metadata = _MetadataUnpickler(file).load()
    for info in metadata.storage_data.values():
        info.relative_path = "../elsewhere.distcp"
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    rehash_manifest(checkpoint)
    state, *_ = plain_run(BlockModel())
    with pytest.raises(CheckpointError, match="points at data outside the checkpoint's verified files"):
        tl.load(state, checkpoint)


def test_a_damaged_shard_fails_its_hash_before_dcp_reads_it(job, tmp_path):
    _, directory = job
    checkpoint = copy_checkpoint(directory / "sharded", tmp_path / "damaged")
    shard = checkpoint / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    state, *_ = plain_run(BlockModel())
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp does not match its (XXH3-128|BLAKE3|SHA-256) hash"):
        tl.load(state, checkpoint)


def test_the_export_loads_into_a_plain_module_with_the_same_outputs(job):
    from safetensors.torch import load_model

    results, directory = job
    plain = BlockModel(seed=5)
    load_model(plain, str(directory / "model.safetensors"))
    assert_weights(plain.state_dict(), results["uninterrupted_weights"], atol=0)
    torch.testing.assert_close(plain(probe_input()), results["sharded_output"], atol=1e-6, rtol=0)


# -- killed, and resumed on other world sizes --------------------------------------------------


def test_sigkill_during_a_sharded_save_keeps_the_previous_checkpoint(killed_in_save):
    done, checkpoints = killed_in_save
    assert done.returncode != 0 and "rank 1" in done.stderr and "exit code -9" in done.stderr
    assert (checkpoints / "latest").read_text().strip() == "step-00000002"
    assert verify(checkpoints / "step-00000002")["world_size"] == 2
    assert not (checkpoints / "step-00000004").exists()


def test_a_two_rank_checkpoint_resumes_on_one_rank_to_the_uninterrupted_weights(job, resumed_on_one_rank):
    results, _ = job
    done, resumed, _ = resumed_on_one_rank
    assert "resumed_from" in done.stdout and done.stdout.strip().endswith("step-00000002")
    assert resumed["step"] == results["uninterrupted_steps"] == 9
    assert_weights(resumed["weights"], results["uninterrupted_weights"])


def test_a_one_rank_checkpoint_resumes_on_two_ranks_to_the_uninterrupted_weights(job, resumed_on_one_rank,
                                                                                   tmp_path):
    results, _ = job
    _, _, checkpoints = resumed_on_one_rank
    one_rank = copy_checkpoint(checkpoints / "step-00000004", tmp_path / "ckpt" / "step-00000004")
    assert verify(one_rank)["world_size"] == 1  # written by the run resumed on one rank
    done = run_resumable(2, tmp_path / "ckpt", tmp_path / "out.pt")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("step-00000004")
    resumed = torch.load(tmp_path / "out.pt", weights_only=True)
    assert resumed["step"] == 9
    assert_weights(resumed["weights"], results["uninterrupted_weights"])
