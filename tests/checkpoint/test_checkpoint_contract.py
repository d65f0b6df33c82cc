"""What a checkpoint promises beyond its bytes: what it refuses to write, whose failures are
whose, one writer per directory, and what a resume says."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import trainloop as tl
from tests.support.paths import SCRIPTS
from tests.support.reference import mse, regression_data, tiny_model
from trainloop.callbacks import Callback, Checkpoint, CheckpointWarning
from trainloop.checkpoint import CheckpointError, verify


def run(callbacks=(), accumulate: int = 1, batch_size: int = 4, model=None):
    state = tl.init(seed=0, accumulate=accumulate, callbacks=list(callbacks))
    model = model if model is not None else tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state, model, optimizer, loader = tl.prepare(
        state, model, optimizer, DataLoader(regression_data(64), batch_size=batch_size))
    return state, model, optimizer, loader


def train(state, model, optimizer, batches, steps: int):
    for _ in range(steps * state.config.accumulate):
        with tl.accumulate(state, model):
            state = tl.backward(state, mse(model, *next(batches)))
        state = tl.step(state, optimizer)
    return state


# -- a callback state that cannot be loaded safely is refused at save ------------------


class Best(Callback):
    def __init__(self, value):
        self.value = value

    def state_dict(self):
        return {"best": self.value, "history": [1.0, 2.0]}

    def load_state_dict(self, d):
        self.value = d["best"]


@pytest.mark.parametrize("value", [numpy.float64(0.5), numpy.array([1.0]), frozenset({1})],
                         ids=["numpy scalar", "numpy array", "frozenset"])
def test_a_callback_state_that_weights_only_cannot_load_is_refused_at_save_naming_it(tmp_path, value):
    state, *_ = run([Best(value)])
    with pytest.raises(CheckpointError, match=r"callback 'Best'.*\['best'\].*" + type(value).__name__):
        tl.save(state, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(CheckpointError, match=r"callback 'Best'.*\['best'\]"):
        tl.save(state, tmp_path / "background", background=True)  # refused before staging
    state, *_ = run([Best(0.5)])  # plain data saves and loads
    tl.save(state, tmp_path / "plain")
    restored = Best(None)
    tl.load(run([restored])[0], tmp_path / "plain")
    assert restored.value == 0.5


def test_a_resume_never_starts_over_on_a_directory_whose_checkpoints_all_fail(tmp_path):
    state, model, optimizer, loader = run([Checkpoint(tmp_path, every=1)])
    tl.finish(train(state, model, optimizer, iter(loader), 2))
    for name in ("step-00000001", "step-00000002"):
        (tmp_path / name / "callbacks.pt").write_bytes(b"damaged")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        with pytest.raises(CheckpointError, match=r"none of the 2 checkpoints in .* could be loaded.*resume=False"):
            run([Checkpoint(tmp_path, every=1)])
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000001", "step-00000002"]
    fresh, *_ = run([Checkpoint(tmp_path, every=1, resume=False)])  # the way out the error names
    assert fresh.step == 0


# -- one run's failed background save belongs to that run ------------------------------


def test_one_runs_failed_background_save_is_raised_by_its_own_finish_only(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    failing, *_ = run()
    other, *_ = run()
    tl.save(failing, tmp_path / "a-file" / "ckpt", background=True)  # its parent is a file
    tl.save(other, tmp_path / "fine", background=True)
    tl.finish(other)  # the other run's failure is not this run's
    assert verify(tmp_path / "fine")["step"] == 0
    with pytest.raises(CheckpointError, match="a-file"):
        tl.finish(failing)


# -- a full disk says so --------------------------------------------------------------


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 256 KiB tmpfs (root only): a full disk, not a simulated one."""
    mount = tmp_path / "small"
    mount.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=True,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"cannot mount a small tmpfs here: {error}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow  # starts a process
def test_a_full_disk_is_named_with_the_space_needed(small_filesystem):
    # ~130 KB of weights fit; the optimizer's moments (twice that) do not.
    model = torch.nn.Linear(128, 256)
    state = tl.init()
    optimizer = torch.optim.AdamW(model.parameters())
    state, model, optimizer = tl.prepare(state, model, optimizer)
    state = tl.step(tl.backward(state, model(torch.ones(1, 128)).sum()), optimizer)
    with pytest.raises(CheckpointError, match=r"no space left on .*small.* \(needed ~0\.[0-9] MB"):
        tl.save(state, small_filesystem / "ckpt")
    assert not list(small_filesystem.iterdir())  # nothing left behind


# -- after_commit failing does not deny the commit ------------------------------------


def test_an_after_commit_failure_says_the_checkpoint_was_committed(tmp_path):
    state, *_ = run()

    def fails():
        raise OSError("pruning failed")

    for background in (False, True):
        path = tmp_path / f"background-{background}"
        with pytest.raises(CheckpointError) as raised:
            saved = tl.save(state, path, background=background, after_commit=fails)
            if background:
                saved.result()
        message = str(raised.value)
        assert "was committed" in message and "pruning failed" in message, message
        assert "untouched" not in message
        assert verify(path)["step"] == 0


# -- what a resume says ---------------------------------------------------------------------


def test_resume_says_where_it_resumed_once_on_the_main_process(tmp_path, capfd):
    state, model, optimizer, loader = run([Checkpoint(tmp_path, every=2)])
    tl.finish(train(state, model, optimizer, iter(loader), 4))
    capfd.readouterr()
    resumed, *_ = run([Checkpoint(tmp_path, every=2)])
    err = capfd.readouterr().err
    assert resumed.step == 4
    assert err.count("resumed from") == 1 and "step-00000004 at step 4 (epoch 0)" in err, err


def test_a_resumed_run_with_nothing_left_to_train_says_so(tmp_path, capfd):
    state, model, optimizer, loader = run([Checkpoint(tmp_path, every=2)])
    for _epoch in range(loader.epoch, 1):
        for x, y in loader:
            state = tl.step(tl.backward(state, mse(model, x, y)), optimizer)
    tl.finish(state)
    capfd.readouterr()
    state, model, optimizer, loader = run([Checkpoint(tmp_path, every=2)])
    for _epoch in range(loader.epoch, 1):  # the README loop, run again: nothing is left
        for x, y in loader:
            state = tl.step(tl.backward(state, mse(model, x, y)), optimizer)
    tl.finish(state)
    err = capfd.readouterr().err
    assert "nothing was left to train" in err and "resume=False" in err, err


def test_a_checkpoint_of_another_model_names_the_ways_out(tmp_path):
    state, model, optimizer, loader = run([Checkpoint(tmp_path, every=1)])
    tl.finish(train(state, model, optimizer, iter(loader), 1))
    wider = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    with pytest.raises(ValueError, match=r"does not fit.*resume=False.*another directory"):
        run([Checkpoint(tmp_path, every=1)], model=wider)


def test_resuming_with_another_accumulate_or_batch_size_says_what_changed_once(tmp_path):
    state, model, optimizer, loader = run([Checkpoint(tmp_path, every=1)], accumulate=2, batch_size=4)
    tl.finish(train(state, model, optimizer, iter(loader), 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed, *_ = run([Checkpoint(tmp_path, every=1)], accumulate=4, batch_size=2)
    said = [str(w.message) for w in caught if "accumulate" in str(w.message)]
    assert resumed.step == 2 and len(said) == 1, [str(w.message) for w in caught]
    assert "accumulate 2 -> 4" in said[0] and "batch_size 4 -> 2" in said[0], said[0]
    assert "8 samples per optimizer step, now 8" in said[0], said[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run([Checkpoint(tmp_path, every=1)], accumulate=2, batch_size=4)
    assert not [w for w in caught if "accumulate" in str(w.message)]  # the same schedule: silent


# -- one writer per checkpoint directory ---------------------------------------------------


@pytest.mark.slow  # starts a process
def test_two_jobs_saving_one_path_at_once_never_commit_a_mix(tmp_path):
    for trial in range(3):
        path = tmp_path / f"trial-{trial}" / "ckpt"
        jobs = [subprocess.Popen([sys.executable, str(SCRIPTS / "save_repeatedly.py"), str(path), str(marker), "25"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for marker in (1.0, 2.0)]
        outputs = [job.communicate(timeout=240)[0] for job in jobs]
        assert all(job.returncode == 0 for job in jobs), outputs
        verify(path)  # every file is the one its manifest hashed
        weights = load_file(path / "model.safetensors")
        callbacks = torch.load(path / "callbacks.pt", weights_only=True)
        markers = {*weights["weight"].unique().tolist(), *weights["bias"].unique().tolist(),
                   callbacks["Marker"]["marker"]}
        assert len(markers) == 1, (markers, outputs)  # one job's files, all of them
        assert not list(path.parent.glob(".*")), list(path.parent.glob(".*"))  # no temporary left


def hold(directory: Path) -> subprocess.Popen:
    """Another job: a process that prepares a run checkpointing into `directory`, then waits."""
    holder = subprocess.Popen([sys.executable, str(SCRIPTS / "hold_checkpoint_dir.py"), str(directory)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = holder.stdout.readline()
    if line.strip() != "holding":
        holder.kill()
        pytest.fail(f"the other job could not take the directory: {line}{holder.stdout.read()}")
    return holder


@pytest.mark.slow  # starts a process
def test_a_checkpoint_directory_is_locked_for_one_job_and_a_dead_jobs_lock_is_taken_over(tmp_path):
    directory = tmp_path / "ckpt"
    holder = hold(directory)
    try:
        with pytest.raises(CheckpointError, match=rf"{socket.gethostname()}.*pid {holder.pid}"):
            run([Checkpoint(directory, every=1)])
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # dies holding the lock
        holder.wait()
    state, model, optimizer, loader = run([Checkpoint(directory, every=1)])  # a dead job's lock is taken over
    tl.finish(train(state, model, optimizer, iter(loader), 1))
    assert verify(directory / "step-00000001")["step"] == 1
    holder = hold(directory)  # finish released the lock: the next job takes the directory
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
