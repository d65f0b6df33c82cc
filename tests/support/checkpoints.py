"""Checkpoint helpers shared by tests/checkpoint/: the resumable script, small runs, manifest rewrites."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import trainloop as tl
from tests.support.paths import SCRIPTS
from tests.support.reference import mse, regression_data, tiny_model
from trainloop.callbacks import Checkpoint
from trainloop.checkpoint import finish_saves

RESUMABLE = SCRIPTS / "resumable.py"



def run_script(*args: str, spawn_n: int | None = None, max_restarts: int = 0,
               kill_after_step: int | None = None, kill_rank: int = 0) -> subprocess.CompletedProcess | str:
    """Run resumable.py (under spawn when spawn_n); optionally SIGKILL a worker after a step line."""
    launcher = (["-m", "trainloop.spawn", "-n", str(spawn_n), "--max-restarts", str(max_restarts)]
                if spawn_n else [])
    command = [sys.executable, *launcher, str(RESUMABLE), *args]
    if kill_after_step is None:
        return subprocess.run(command, capture_output=True, text=True, timeout=240)
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids, lines = {}, []
    for line in job.stdout:
        lines.append(line)
        for rank, pid in re.findall(r"pid (\d+) (\d+)", line):
            pids[int(rank)] = int(pid)
        if kill_after_step is not None and re.search(rf"step {kill_after_step}(?!\d)", line) and kill_rank in pids:
            os.kill(pids.pop(kill_rank), signal.SIGKILL)
            kill_after_step = None
            if not spawn_n:
                break
    job.wait(timeout=240)
    return "".join(lines) + (job.stdout.read() or "")


def assert_identical(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["lr"] == b["lr"]
    for name in a["weights"]:
        assert torch.equal(a["weights"][name], b["weights"][name]), name
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
    assert torch.equal(a["draws"], b["draws"])


def small_run(directory: Path, steps: int, **checkpoint_kwargs):
    """A tiny prepared run with a Checkpoint callback, trained `steps` optimizer steps."""
    model = tiny_model()
    checkpoint = Checkpoint(directory, **checkpoint_kwargs)
    state = tl.init(callbacks=[checkpoint])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = DataLoader(regression_data(64), batch_size=4, shuffle=True)
    state, model, optimizer, loader = tl.prepare(state, model, optimizer, loader)
    batches = iter(loader)
    for _ in range(steps):
        state = tl.step(tl.backward(state, mse(model, *next(batches))), optimizer)
    finish_saves(state)  # the background saves are committed, as tl.finish would wait for them
    return state, model, optimizer, checkpoint


def rehash_manifest(checkpoint: Path, **changes) -> None:
    from trainloop.checkpoint.files import file_record as _file_record
    from trainloop.checkpoint.manifest import _canonical_hash

    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest.update(changes)
    manifest["files"] = {name: _file_record(checkpoint / name) for name in manifest["files"]}
    del manifest["manifest_sha256"]
    manifest["manifest_sha256"] = _canonical_hash(manifest)
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
