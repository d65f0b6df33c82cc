"""Checkpoints: exact resumption after real SIGKILLs, atomic saves, integrity, safe loading."""

from __future__ import annotations

import json
import resource
import signal
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import trainloop as tl
from tests.support.checkpoints import assert_identical, rehash_manifest, run_script, small_run
from tests.support.reference import CountingDataset, regression_data, tiny_model
from trainloop.callbacks import CheckpointWarning
from trainloop.checkpoint import FORMAT_VERSION, CheckpointError, verify


@pytest.mark.slow  # SIGKILLed children
def test_sigkilled_mid_epoch_and_restarted_ends_bit_identical(tmp_path, uninterrupted):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out.pt")
    run_script(ckpt, out, "--slow", "0.5", kill_after_step=5)  # slow: the kill lands before step 6
    assert not Path(out).exists()  # it really died before the end
    resumed = run_script(ckpt, out)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed_at 4" in resumed.stdout  # the checkpoint of step 4, mid-epoch 2 of 3
    assert_identical(torch.load(out, weights_only=True), uninterrupted)


@pytest.mark.slow  # SIGKILLed children
def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tmp_path, uninterrupted):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.pt"
    died = run_script(str(ckpt), str(out), "--kill-in-save", "6")
    assert died.returncode == -signal.SIGKILL
    assert (ckpt / "latest").read_text().strip() == "step-00000004"
    assert verify(ckpt / "step-00000004")["step"] == 4
    assert not (ckpt / "step-00000006").exists() and list(ckpt.glob(".step-00000006.*.partial"))
    resumed = run_script(str(ckpt), str(out))
    assert resumed.returncode == 0 and "resumed_at 4" in resumed.stdout
    assert_identical(torch.load(out, weights_only=True), uninterrupted)
    assert not list(ckpt.glob(".*.partial"))  # cleaned by the next successful save


@pytest.mark.multiprocess
def test_ddp_worker_sigkilled_is_restarted_by_spawn_and_ends_bit_identical(tmp_path):
    whole = tmp_path / "whole"
    done = run_script(str(whole / "ckpt"), str(whole / "out.pt"), spawn_n=2)
    assert done.returncode == 0, done.stdout + done.stderr
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.pt"
    output = run_script(str(ckpt), str(out), "--slow", "0.5", spawn_n=2, max_restarts=1,
                        kill_after_step=3, kill_rank=1)
    assert "resumed_at 2" in output, output  # the restarted workers continued from step 2
    assert_identical(torch.load(out, weights_only=True), torch.load(whole / "out.pt", weights_only=True))
    assert torch.load(out, weights_only=True)["restarts"] == 1


# -- in-process checks of the format ---------------------------------------------------------


FILES = ["manifest.json", "model.safetensors", "optimizer.pt", "callbacks.pt", "rng.pt", "trainer.json"]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
@pytest.mark.parametrize("name", FILES)
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, name, damage):
    small_run(tmp_path, steps=2, every=1)
    file = tmp_path / "step-00000002" / name
    data = bytearray(file.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) // 2]
    file.write_bytes(bytes(data))
    with pytest.warns(CheckpointWarning, match=f"skipping checkpoint .*step-00000002.*{name}"):
        state, *_, checkpoint = small_run(tmp_path, steps=0, every=1)
    assert state.step == 1 and checkpoint.restored_from.name == "step-00000001"
    with pytest.raises(CheckpointError, match=name):
        tl.load(state, tmp_path / "step-00000002")


def test_keep_leaves_exactly_k_checkpoints(tmp_path):
    small_run(tmp_path, steps=7, every=1, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "step-00000005", "step-00000006", "step-00000007"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000007"


def test_resume_restores_weights_optimizer_and_loader_position(tmp_path):
    _state, model, _optimizer, _ = small_run(tmp_path, steps=3, every=3)
    resumed, model2, optimizer2, _checkpoint = small_run(tmp_path, steps=0, every=3)
    assert resumed.step == 3 and resumed.micro_step == 3
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert resumed.loaders[0].samples_seen == 12
    assert optimizer2.state_dict()["state"][0]["step"] == 3


def test_a_crafted_pickle_is_refused_and_never_executed(tmp_path):
    state, *_ = small_run(tmp_path, steps=1, every=1)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    checkpoint = tmp_path / "step-00000001"
    torch.save({"optimizers": [Payload()], "schedulers": []}, checkpoint / "optimizer.pt")
    rehash_manifest(checkpoint)  # an attacker who can write the files can rewrite the manifest too
    with pytest.raises(CheckpointError, match=r"refusing to load .*optimizer.pt.*asks for io.open"):
        tl.load(state, checkpoint)
    assert not marker.exists()


def test_not_a_checkpoint_future_format_and_escaping_paths(tmp_path):
    state, *_ = small_run(tmp_path / "ckpt", steps=1, every=1)
    with pytest.raises(CheckpointError, match="is not a trainloop checkpoint"):
        tl.load(state, tmp_path)
    checkpoint = tmp_path / "ckpt" / "step-00000001"
    rehash_manifest(checkpoint, format_version=99)
    with pytest.raises(CheckpointError, match="format 99, newer than this trainloop reads.*upgrade"):
        tl.load(state, checkpoint)
    rehash_manifest(checkpoint, format_version=FORMAT_VERSION)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"]["../../etc/passwd"] = {"size": 1, manifest["hash"]: "0"}
    del manifest["manifest_sha256"]
    from trainloop.checkpoint.manifest import _canonical_hash

    manifest["manifest_sha256"] = _canonical_hash(manifest)
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="names a file outside the checkpoint"):
        tl.load(state, checkpoint)


def test_a_model_that_does_not_fit_lists_the_mismatches(tmp_path):
    _state, *_ = small_run(tmp_path, steps=1, every=1)
    other = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.0), nn.Linear(8, 3))
    fresh = tl.init()
    fresh, other, _opt = tl.prepare(fresh, other, torch.optim.AdamW(other.parameters()))
    fresh, _ = tl.prepare(fresh, DataLoader(regression_data(8), batch_size=4))
    with pytest.raises(ValueError, match=r"0.weight: checkpoint \(16, 6\), model \(8, 6\)"):
        tl.load(fresh, tmp_path / "step-00000001")


def test_disk_full_during_save_raises_keeps_previous_and_next_save_works(tmp_path):
    model = nn.Linear(64, 64)
    state = tl.init()
    state, model, _optimizer = tl.prepare(state, model, torch.optim.AdamW(model.parameters()))
    tl.save(state, tmp_path / "good")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, hard))  # like a disk with 8 KiB left
    try:
        with pytest.raises(CheckpointError, match="could not write checkpoint .*bad.*previous checkpoints are untouched"):
            tl.save(state, tmp_path / "bad")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".*partial"))
    assert verify(tmp_path / "good")["step"] == 0
    assert (tmp_path / "latest").read_text().strip() == "good"
    tl.save(state, tmp_path / "after")
    assert verify(tmp_path / "after")


@pytest.mark.slow  # a 2-process job
def test_checkpoint_saved_on_two_ranks_loads_on_one(tmp_path):
    """The DDP checkpoint format is replicated: a 2-rank checkpoint loads at world size 1."""
    ckpt = tmp_path / "ckpt"
    done = run_script(str(ckpt), str(tmp_path / "out.pt"), "--epochs", "1", "--every", "1", spawn_n=2)
    assert done.returncode == 0, done.stdout + done.stderr
    newest = ckpt / (ckpt / "latest").read_text().strip()
    manifest = verify(newest)
    assert manifest["world_size"] == 2
    model = tiny_model(dropout=0.2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = tl.init()
    state, model, optimizer, loader = tl.prepare(
        state, model, optimizer, DataLoader(CountingDataset(44), batch_size=4, shuffle=True))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
    state, scheduler = tl.prepare(state, scheduler)
    state = tl.load(state, newest)
    saved = torch.load(tmp_path / "out.pt", weights_only=True)
    assert state.step == saved["step"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved["weights"][name])
    # The epoch was complete: the position moves on to the next epoch, re-sharded for one rank.
    assert loader.epoch == 1 and loader.samples_seen == 0 and len(loader) == 11
