"""Background checkpoint saves, one pass over the bytes, format 2 and format 1.

The kill tests of background saves are in test_checkpoint.py and test_checkpoint_fallback.py:
`Checkpoint(background=True)` is the default, so every SIGKILL there (at fixed points of a save,
and at random instants of a run that saves and prunes at every step) lands on background saves
and ends bit-identical to the uninterrupted run.
"""

from __future__ import annotations

import resource
import shutil
import signal
import time
from concurrent.futures import Future

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import trainloop as tl
from tests.checkpoint.checkpoint_workers import background_disk_full
from tests.support.paths import DATA
from tests.support.reference import mse, regression_data, tiny_model
from trainloop import spawn
from trainloop.callbacks import Checkpoint, CheckpointWarning
from trainloop.checkpoint import CheckpointError, PreviousSaveFailed, finish_saves, verify
from trainloop.checkpoint import files as checkpoint_files

V1_CHECKPOINT = DATA / "v1-checkpoint"


def prepared_run(callbacks=(), seed: int = 0):
    model = tiny_model(seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    state = tl.init(seed=seed, callbacks=list(callbacks))
    state, model, optimizer, loader, scheduler = tl.prepare(
        state, model, optimizer, DataLoader(regression_data(64), batch_size=4, shuffle=True), scheduler)
    return state, model, optimizer, iter(loader)


def train(state, model, optimizer, batches, steps: int):
    for _ in range(steps):
        state = tl.step(tl.backward(state, mse(model, *next(batches))), optimizer)
    return state


@pytest.fixture
def slow_disk(monkeypatch):
    """Every checkpoint file's fsync takes 0.3 s more, so a background save is still being
    written while the test trains on. The real writer, only slower."""
    close = checkpoint_files.HashingFile.close

    def slow_close(self):
        time.sleep(0.3)
        return close(self)

    monkeypatch.setattr(checkpoint_files.HashingFile, "close", slow_close)


def test_a_background_checkpoint_equals_a_synchronous_one_of_the_same_step(tmp_path, slow_disk):
    state, model, optimizer, batches = prepared_run()
    state = train(state, model, optimizer, batches, 3)
    assert tl.save(state, tmp_path / "synchronous") == tmp_path / "synchronous"
    at_step_3 = {k: v.clone() for k, v in model.state_dict().items()}
    future = tl.save(state, tmp_path / "background", background=True)
    assert isinstance(future, Future) and not future.done()  # the loop goes on while it is written
    state = train(state, model, optimizer, batches, 3)  # mutates the parameters and moments in place
    assert not future.done()
    assert future.result() == tmp_path / "background"
    assert not torch.equal(model.state_dict()["0.weight"], at_step_3["0.weight"])
    for file in sorted((tmp_path / "synchronous").iterdir()):
        assert (tmp_path / "background" / file.name).read_bytes() == file.read_bytes(), file.name
    fresh, fresh_model, _, _ = prepared_run(seed=1)
    fresh = tl.load(fresh, tmp_path / "background")
    assert fresh.step == 3
    assert all(torch.equal(v, at_step_3[k]) for k, v in fresh_model.state_dict().items())


def test_one_save_in_flight_and_finish_waits_for_it(tmp_path, slow_disk):
    state, model, optimizer, batches = prepared_run()
    first = tl.save(state, tmp_path / "first", background=True)
    state = train(state, model, optimizer, batches, 1)
    second = tl.save(state, tmp_path / "second", background=True)
    assert first.done() and not second.done()  # the second save began after the first was done
    tl.finish(state)
    assert second.done() and verify(tmp_path / "second")["step"] == 1


class DiskFull:
    """RLIMIT_FSIZE: writing past `room` bytes fails with EFBIG, like a full disk."""

    def __init__(self, room: int = 8192):
        self.room = room

    def __enter__(self):
        self.limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        self.handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.room, self.limits[1]))

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_FSIZE, self.limits)
        signal.signal(signal.SIGXFSZ, self.handler)


def test_disk_full_during_a_background_save_fails_its_future_and_keeps_the_previous(tmp_path):
    state, model, optimizer, batches = prepared_run()
    tl.save(state, tmp_path / "good", background=True).result()
    with DiskFull():
        future = tl.save(train(state, model, optimizer, batches, 1), tmp_path / "bad", background=True)
        error = future.exception()
    assert isinstance(error, CheckpointError) and "could not write checkpoint" in str(error) and "bad" in str(error)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".*partial"))
    assert verify(tmp_path / "good")["step"] == 0 and (tmp_path / "latest").read_text().strip() == "good"
    tl.save(state, tmp_path / "after", background=True).result()  # retrieved: not raised again


def test_a_background_failure_nobody_retrieved_is_raised_by_the_next_save(tmp_path):
    state, model, optimizer, batches = prepared_run()
    with DiskFull():
        tl.save(state, tmp_path / "bad", background=True)  # the Future is dropped
        with pytest.raises(PreviousSaveFailed, match="previous background save failed: could not write .*bad"):
            tl.save(state, tmp_path / "next", background=True)
    assert not (tmp_path / "next").exists()  # the failing call saved nothing
    assert tl.save(state, tmp_path / "next", background=True).result() == tmp_path / "next"
    with DiskFull():
        tl.save(state, tmp_path / "bad", background=True)
        with pytest.raises(CheckpointError, match="could not write .*bad"):
            tl.finish(state)  # ... or by finish


def test_checkpoint_callback_background_failure_surfaces_at_the_next_save_step(tmp_path):
    """on_error="warn": one warning at the next save step (not before), and that step's save is
    made; the failed step's checkpoint never appears."""
    checkpoint = Checkpoint(tmp_path, every=2, on_error="warn")
    state, model, optimizer, batches = prepared_run([checkpoint])
    state = train(state, model, optimizer, batches, 2)
    finish_saves(state)  # step 2's save is committed
    with pytest.warns(CheckpointWarning) as caught:
        with DiskFull(room=2048):
            state = train(state, model, optimizer, batches, 1)
            state = train(state, model, optimizer, batches, 1)  # step 4's save fails in the background
            time.sleep(0.5)
            state = train(state, model, optimizer, batches, 1)  # step 5: nothing is checked
            assert not caught.list
        state = train(state, model, optimizer, batches, 1)  # step 6: warned, then saved
        tl.finish(state)
    assert len(caught.list) == 1 and "step-00000004" in str(caught.list[0].message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000002", "step-00000006"]
    assert verify(tmp_path / "step-00000006")["step"] == 6


@pytest.mark.multiprocess
def test_a_background_failure_on_rank_0_is_raised_on_every_rank_at_the_next_save(tmp_path):
    results = spawn.run(background_disk_full, str(tmp_path / "ckpt"), n=2)
    for result in results:
        assert list(result["raised"]) == [6], result  # not at step 5: the next save step
        assert "rank 0: could not write checkpoint" in result["raised"][6] and "step-00000004" in result["raised"][6]
    assert results[0]["committed"] == ["latest", "step-00000002"]


def test_new_checkpoints_name_their_hash_and_files_are_hashed_as_written(tmp_path):
    state, *_ = prepared_run()
    tl.save(state, tmp_path / "saved")
    manifest = verify(tmp_path / "saved")
    assert manifest["format_version"] == 2 and manifest["hash"] == "xxh3_128"
    for name, record in manifest["files"].items():
        assert record == checkpoint_files.file_record(tmp_path / "saved" / name, "xxh3_128"), name
    # The weights file, written by trainloop's own streaming writer, is plain safetensors.
    weights = load_file(tmp_path / "saved" / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in state.models[0].state_dict().items())


@pytest.mark.parametrize("algorithm", ["xxh3_128", "blake3", "sha256"])
def test_each_hash_algorithm_loads_and_refuses_a_flipped_byte(tmp_path, monkeypatch, algorithm):
    """XXH3-128 is the default; checkpoints hashed with BLAKE3 (the first format-2 trainloop) or
    SHA-256 (a machine without xxhash and blake3) still load, and a flipped byte in any of them is
    refused. The large files are hashed beside their writes, so this covers the overlapped writer."""
    from trainloop.checkpoint import writing

    monkeypatch.setattr(writing, "default_hash", lambda: algorithm)
    state, model, optimizer, batches = prepared_run()
    state = train(state, model, optimizer, batches, 2)
    saved = tl.save(state, tmp_path / "saved", background=True).result()
    manifest = verify(saved)
    assert manifest["hash"] == algorithm
    for name, record in manifest["files"].items():
        assert set(record) == {"size", algorithm}
        assert record == checkpoint_files.file_record(saved / name, algorithm), name
    fresh, fresh_model, fresh_optimizer, _ = prepared_run(seed=1)
    fresh = tl.load(fresh, saved)
    assert fresh.step == 2
    assert all(torch.equal(a, b) for a, b in zip(fresh_model.state_dict().values(), model.state_dict().values()))
    for name in ("model.safetensors", "optimizer.pt"):
        damaged = tmp_path / f"damaged-{name}"
        shutil.copytree(saved, damaged)
        data = bytearray((damaged / name).read_bytes())
        data[len(data) * 2 // 3] ^= 0x10
        (damaged / name).write_bytes(bytes(data))
        spelled = {"xxh3_128": "XXH3-128", "blake3": "BLAKE3", "sha256": "SHA-256"}[algorithm]
        with pytest.raises(CheckpointError, match=f"{name} does not match its {spelled} hash"):
            tl.load(fresh, damaged)


def test_large_writes_are_hashed_in_order_beside_the_write(tmp_path):
    """The writer hashes a large buffer on another thread while writing it: the digest of many
    writes, large and small interleaved, is the digest of the file they make."""
    pieces = [bytes([i]) * size for i, size in enumerate([3, 5 << 20, 1, 2 << 20, 7, 9 << 20])]
    record = checkpoint_files.write_file(tmp_path / "file", lambda f: [f.write(p) for p in pieces], "xxh3_128")
    assert record == checkpoint_files.file_record(tmp_path / "file", "xxh3_128")
    assert record["size"] == sum(map(len, pieces)) == (tmp_path / "file").stat().st_size
    assert record["xxh3_128"] == checkpoint_files.hash_bytes(b"".join(pieces), "xxh3_128")


def test_staging_copies_on_several_cores_are_exact(monkeypatch):
    """A large CPU tensor is staged in pieces on several threads: every byte lands, small and
    non-contiguous tensors too."""
    from trainloop.checkpoint import staging as checkpoint_staging

    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(checkpoint_staging.os, "cpu_count", lambda: 4)
    checkpoint_staging._copiers.cache_clear()
    staging = checkpoint_staging.Staging()
    tensors = {"big": torch.randn(3_000_007), "small": torch.arange(10), "strided": torch.randn(2000, 600).t()}
    staged = staging.tree(tensors, ("t",))
    staging.wait()
    for name, tensor in tensors.items():
        assert torch.equal(staged[name], tensor) and staged[name].data_ptr() != tensor.data_ptr(), name
    assert checkpoint_staging._copiers.cache_info().currsize == 1  # the big one was split


def v1_run():
    """The run that tests/support/data/make_v1_checkpoint.py trained and saved, before its training."""
    model = tiny_model(seed=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    state = tl.init(seed=3)
    state, model, optimizer, loader, scheduler = tl.prepare(
        state, model, optimizer, DataLoader(regression_data(16), batch_size=4, shuffle=True), scheduler)
    return state, model, optimizer, loader, scheduler


def test_a_format_1_checkpoint_written_by_the_previous_trainloop_loads(tmp_path):
    manifest = verify(V1_CHECKPOINT)
    assert manifest["format_version"] == 1 and "hash" not in manifest
    assert set(manifest["files"]["rng.pt"]) == {"size", "sha256"}
    state, model, optimizer, loader, scheduler = v1_run()
    state = tl.load(state, V1_CHECKPOINT)
    assert state.step == 2 and loader.samples_seen == 8 and scheduler.get_last_lr() == [0.0025]
    weights = load_file(V1_CHECKPOINT / "model.safetensors")
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    saved = torch.load(V1_CHECKPOINT / "optimizer.pt", weights_only=True)["optimizers"][0]
    for index, values in optimizer.state_dict()["state"].items():
        assert all(torch.equal(values[k], saved["state"][index][k]) for k in values)
    state = train(state, model, optimizer, iter(loader), 1)  # and it trains on
    assert state.step == 3


def test_staging_reuses_its_buffers_from_save_to_save(tmp_path):
    """Memory is bounded: one staged copy of the state, the same buffers at every save."""
    state, model, optimizer, batches = prepared_run()
    state = train(state, model, optimizer, batches, 1)
    tl.save(state, tmp_path / "first", background=True).result()
    writer = state.lineage.writer  # the run's own
    buffers = {key: buffer.data_ptr() for key, buffer in writer.staging._buffers.items()}
    assert ("model", 0, "0.weight") in buffers and ("optimizer", 0, "state", 0, "exp_avg") in buffers
    state = train(state, model, optimizer, batches, 1)
    tl.save(state, tmp_path / "second", background=True).result()
    assert {key: buffer.data_ptr() for key, buffer in writer.staging._buffers.items()} == buffers
    tl.finish(state)
    assert not writer.staging._buffers  # finish gives the memory back
