"""Damaged checkpoints fall back, never crash; misfits are refused before anything is restored;
pruning is atomic.

A damaged checkpoint is a CheckpointError from `tl.load`, and for `Checkpoint(resume=True)` one
warning and the previous good checkpoint: never an AttributeError, KeyError, UnicodeDecodeError
or a raw PermissionError, which would repeat on every restart under `--max-restarts`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import trainloop as tl
from tests.support.checkpoints import RESUMABLE, assert_identical, rehash_manifest, small_run
from tests.support.processes import child_env, why_user_cannot_run_python
from tests.support.reference import regression_data, tiny_model
from trainloop.callbacks import Checkpoint, CheckpointWarning
from trainloop.checkpoint import CheckpointError, verify
from trainloop.checkpoint.manifest import _canonical_hash

NEWEST = "step-00000002"


def rewrite_manifest(checkpoint: Path, change) -> None:
    """Apply `change` to the manifest and seal it again with a valid self-hash."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    change(manifest)
    manifest.pop("manifest_sha256", None)
    manifest["manifest_sha256"] = _canonical_hash(manifest)
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def resume_warnings(directory: Path) -> tuple[tl.RunState, Checkpoint, list[str]]:
    """Resume a fresh run from `directory`; its state, its Checkpoint and the warnings given."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state, *_, checkpoint = small_run(directory, steps=0, every=1)
    return state, checkpoint, [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]


def assert_falls_back(directory: Path, reason: str) -> None:
    """One warning naming the damaged checkpoint and the reason; the previous one is used; and
    `tl.load` of the damaged one is a CheckpointError."""
    state, checkpoint, given = resume_warnings(directory)
    assert len(given) == 1, given
    assert NEWEST in given[0] and reason in given[0], given[0]
    assert checkpoint.restored_from.name == "step-00000001" and state.step == 1
    with pytest.raises(CheckpointError, match=reason):
        tl.load(state, directory / NEWEST)


def drop_key(key):
    def change(manifest):
        del manifest["files"]["optimizer.pt"][key or manifest["hash"]]  # None: the digest
    return change


MANIFEST_DAMAGE = {
    "files is a list": (lambda m: m.update(files=sorted(m["files"])), "'files' is not a mapping"),
    "files is a string": (lambda m: m.update(files="model.safetensors"), "'files' is not a mapping"),
    "a record is a number": (lambda m: m["files"].update({"rng.pt": 12}), "the record of 'rng.pt'"),
    "a record lacks size": (drop_key("size"), "the record of 'optimizer.pt'"),
    "a record lacks its digest": (drop_key(None), "the record of 'optimizer.pt'"),
    "an unknown hash algorithm": (lambda m: m.update(hash="md5"), "names the hash 'md5'"),
    "a size is a string": (lambda m: m["files"]["rng.pt"].update(size="12"), "the record of 'rng.pt'"),
    "models is missing": (lambda m: m.pop("models"), "'models' is not a count"),
}


@pytest.mark.parametrize("damage", list(MANIFEST_DAMAGE))
def test_an_ill_formed_manifest_is_a_checkpoint_error_and_falls_back(tmp_path, damage):
    change, reason = MANIFEST_DAMAGE[damage]
    small_run(tmp_path, steps=2, every=1)
    rewrite_manifest(tmp_path / NEWEST, change)
    assert_falls_back(tmp_path, reason)


def test_a_latest_pointer_of_non_utf8_bytes_warns_once_and_resumes_the_newest(tmp_path):
    small_run(tmp_path, steps=2, every=1)
    (tmp_path / "latest").write_bytes(b"\xff\xfestep-00000002\n")
    state, checkpoint, given = resume_warnings(tmp_path)
    assert len(given) == 1 and "latest" in given[0] and "damaged" in given[0], given
    assert checkpoint.restored_from.name == NEWEST and state.step == 2


def test_a_file_the_manifest_does_not_list_is_never_read(tmp_path):
    """A trainer.json dropped from a re-hashed manifest was read unverified: resumed at step 999."""
    small_run(tmp_path, steps=2, every=1)
    checkpoint = tmp_path / NEWEST
    trainer = json.loads((checkpoint / "trainer.json").read_text())
    (checkpoint / "trainer.json").write_text(json.dumps({**trainer, "step": 999}))
    rewrite_manifest(checkpoint, lambda m: m["files"].pop("trainer.json"))
    assert_falls_back(tmp_path, "does not list trainer.json")


def test_a_listed_file_that_load_does_not_need_is_still_verified(tmp_path):
    small_run(tmp_path, steps=2, every=1)
    checkpoint = tmp_path / NEWEST
    (checkpoint / "notes.txt").write_text("hello")
    rehash_manifest(checkpoint)  # keeps the listed names only: notes.txt is unlisted and ignored
    tl.load(small_run(tmp_path / "other", steps=0)[0], checkpoint)
    rewrite_manifest(checkpoint, lambda m: m["files"].update(
        {"notes.txt": {"size": 5, m["hash"]: "0" * 64}}))
    assert_falls_back(tmp_path, "notes.txt does not match")


@pytest.mark.parametrize("name", ["rng.pt", "model.safetensors"])
def test_a_symbolic_link_in_a_checkpoint_is_refused(tmp_path, name):
    small_run(tmp_path / "ckpt", steps=2, every=1)
    checkpoint = tmp_path / "ckpt" / NEWEST
    outside = tmp_path / "outside"
    shutil.move(checkpoint / name, outside)  # the same bytes: size and hash match the manifest
    (checkpoint / name).symlink_to(outside)
    assert_falls_back(tmp_path / "ckpt", f"{name} is a symbolic link")


def test_an_unlisted_symbolic_link_in_a_checkpoint_is_refused(tmp_path):
    small_run(tmp_path / "ckpt", steps=2, every=1)
    (tmp_path / "ckpt" / NEWEST / "extra").symlink_to("/etc/hostname")
    assert_falls_back(tmp_path / "ckpt", "extra is a symbolic link")


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_every_written_file_follows_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        state, *_ = small_run(tmp_path / "ckpt", steps=1, every=1)
        tl.export(state, tmp_path / "model.safetensors")
    finally:
        os.umask(previous)
    files = [*(tmp_path / "ckpt" / "step-00000001").iterdir(), tmp_path / "ckpt" / "latest",
             tmp_path / "model.safetensors"]
    modes = {file.name: oct(file.stat().st_mode & 0o777) for file in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes  # safetensors' writer made 0o600


UNREADABLE = r"""
import sys, warnings
from tests.support.checkpoints import small_run
from trainloop.callbacks import CheckpointWarning
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    state, *_, checkpoint = small_run(__import__("pathlib").Path(sys.argv[1]), steps=0, every=1)
print("restored_from", checkpoint.restored_from.name)
print("warnings", [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)])
"""


@pytest.mark.slow  # a child as nobody
def test_an_unreadable_file_is_a_checkpoint_error_and_falls_back():
    """A PermissionError reading a file is a damaged checkpoint, not a crash.

    Root reads everything: as root the resume runs as the user `nobody` in a subprocess (skipped
    where `nobody` cannot run this interpreter, e.g. a virtual environment under /root).
    """
    as_nobody = {}
    if os.geteuid() == 0:
        reason = why_user_cannot_run_python("nobody")
        if reason:
            pytest.skip(reason)
        as_nobody = {"user": "nobody"}
    with tempfile.TemporaryDirectory() as scratch:  # not pytest's tmp_path: `nobody` must enter it
        directory = Path(scratch) / "ckpt"
        os.chmod(scratch, 0o755)
        previous = os.umask(0o022)
        try:
            small_run(directory, steps=2, every=1)
        finally:
            os.umask(previous)
        (directory / NEWEST / "optimizer.pt").chmod(0o000 if os.geteuid() else 0o600)
        done = subprocess.run([sys.executable, "-c", UNREADABLE, str(directory)], capture_output=True,
                              text=True, timeout=120, cwd=scratch, env=child_env(), **as_nobody)
    assert done.returncode == 0, done.stderr
    assert "restored_from step-00000001" in done.stdout, done.stdout
    assert "optimizer.pt: Permission denied" in done.stdout and done.stdout.count("skipping") == 1


# -- a checkpoint that does not fit the run: refused before anything is restored --------------


def fresh_run(optimizer_factory=None, scheduler=False, models=1):
    """A run prepared like small_run's, but with other objects; nothing trained."""
    built = [tiny_model(seed=10 + i) for i in range(models)]
    parameters = [p for model in built for p in model.parameters()]
    optimizer = (optimizer_factory or (lambda params: torch.optim.AdamW(params, lr=1e-2)))(parameters)
    loader = DataLoader(regression_data(64), batch_size=4, shuffle=True)
    state = tl.init()
    state, *prepared = tl.prepare(state, *built, optimizer, loader)
    if scheduler:
        state, _ = tl.prepare(state, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1))
    return state, prepared[:models], prepared[models], prepared[models + 1]


def snapshot(models, optimizer, loader) -> tuple:
    return ([{k: v.clone() for k, v in tl.unwrap(m).state_dict().items()} for m in models],
            repr(optimizer.state_dict()), loader.state_dict())


MISFITS = {
    "another optimizer class": (dict(optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
                                "optimizer 0 is a torch.optim.sgd.SGD in the run, a torch.optim.adamw.AdamW"),
    "more param groups": (dict(optimizer_factory=lambda p: torch.optim.AdamW([{"params": p[:2]}, {"params": p[2:]}])),
                          r"param groups of \[2, 2\] parameters in the run, \[4\] in the checkpoint"),
    "a scheduler the checkpoint lacks": (dict(scheduler=True), "holds 0 schedulers but the run prepared 1"),
}


@pytest.mark.parametrize("misfit", list(MISFITS))
def test_a_checkpoint_of_other_optimizers_is_refused_before_anything_is_restored(tmp_path, misfit):
    """Another optimizer's state loaded silently; the first step died with KeyError: 'momentum'."""
    kwargs, message = MISFITS[misfit]
    small_run(tmp_path, steps=2, every=2)
    state, models, optimizer, loader = fresh_run(**kwargs)
    before = snapshot(models, optimizer, loader)
    with pytest.raises(ValueError, match=message):
        tl.load(state, tmp_path / NEWEST)
    after = snapshot(models, optimizer, loader)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before[0], after[0]) for k in a)
    assert before[1:] == after[1:]


def test_another_scheduler_class_is_refused(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    state, model, optimizer = tl.prepare(tl.init(), model, optimizer)
    state, _ = tl.prepare(state, torch.optim.lr_scheduler.StepLR(optimizer, step_size=3))
    tl.save(state, tmp_path / "saved")
    other = tiny_model()
    other_optimizer = torch.optim.AdamW(other.parameters())
    fresh, other, other_optimizer = tl.prepare(tl.init(), other, other_optimizer)
    fresh, _ = tl.prepare(fresh, torch.optim.lr_scheduler.ExponentialLR(other_optimizer, gamma=0.5))
    with pytest.raises(ValueError, match="scheduler 0 is a torch.optim.lr_scheduler.ExponentialLR in the run, "
                                         "a torch.optim.lr_scheduler.StepLR in the checkpoint"):
        tl.load(fresh, tmp_path / "saved")


def test_a_second_model_that_does_not_fit_leaves_the_first_unrestored(tmp_path):
    models = [tiny_model(seed=1), tiny_model(seed=2)]
    state, *models = tl.prepare(tl.init(), *models)
    tl.save(state, tmp_path / "saved")
    first, second = tiny_model(seed=3), torch.nn.Linear(6, 3)
    fresh, first, second = tl.prepare(tl.init(), first, second)
    weights = {k: v.clone() for k, v in first.state_dict().items()}
    with pytest.raises(ValueError, match="model-1.safetensors does not fit Linear"):
        tl.load(fresh, tmp_path / "saved")
    assert all(torch.equal(weights[k], v) for k, v in first.state_dict().items())


# -- pruning is atomic -------------------------------------------------------------------------


def assert_every_committed_checkpoint_verifies(directory: Path) -> None:
    committed = [p for p in directory.iterdir() if p.name.startswith("step-")]
    for checkpoint in committed:
        verify(checkpoint)  # raises, naming the file, for a half-deleted one
    if (directory / "latest").exists():
        assert (directory / (directory / "latest").read_text().strip()) in committed


def run_resumable(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RESUMABLE), *args], capture_output=True, text=True, timeout=240)


@pytest.mark.slow  # SIGKILLed children
def test_a_process_killed_mid_prune_leaves_only_whole_checkpoints(tmp_path, uninterrupted):
    """`keep` deleted in place: a prune killed after one file left a committed-looking remain."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.pt"
    died = run_resumable(str(ckpt), str(out), "--every", "1", "--keep", "2", "--kill-in-prune")
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert_every_committed_checkpoint_verifies(ckpt)
    assert list(ckpt.glob(".*.pruned"))  # the remain is hidden: it left the committed namespace first
    resumed = run_resumable(str(ckpt), str(out), "--every", "1", "--keep", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert_identical(torch.load(out, weights_only=True), uninterrupted)
    assert not list(ckpt.glob(".*"))  # the next save cleaned the remains


@pytest.mark.slow  # SIGKILLed children
def test_sigkills_at_random_instants_of_saves_and_prunes_leave_whole_checkpoints(tmp_path, uninterrupted):
    """Saves are background saves (the default) on a slow disk, so that one is in flight most of
    the time: each kill may land in staging, writing, the commit, a prune or training. Every
    time the committed checkpoints verify, and the run resumed after the last kill ends
    bit-identical to the uninterrupted one."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.pt"
    chance = random.Random(12)
    delays = []
    for _ in range(4):
        job = subprocess.Popen([sys.executable, str(RESUMABLE), str(ckpt), str(out), "--every", "1", "--keep", "1",
                                "--slow", "0.02", "--slow-write", "0.005"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in job.stdout:
            if "resumed_at" in line:
                break
        delays.append(chance.uniform(0.1, 1.0))
        time.sleep(delays[-1])  # a save is in flight most of the time: the kill lands anywhere in one
        job.send_signal(signal.SIGKILL)
        job.communicate(timeout=60)
        assert_every_committed_checkpoint_verifies(ckpt)
    resumed = run_resumable(str(ckpt), str(out), "--every", "1", "--keep", "1")
    assert resumed.returncode == 0, (delays, resumed.stderr)
    assert_identical(torch.load(out, weights_only=True), uninterrupted)
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-00000012"]
