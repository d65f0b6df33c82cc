"""Background (async) sharded saves under FSDP on 2 gloo ranks: not blocking, exact, all-or-nothing.

One `spawn.run` of `async_sharded_checks` (tests/checkpoint/async_sharded_workers.py) runs the
checks that need a live job; DCP's writes are slowed or made to fail there by the checkpoint's
name. The SIGKILL runs tests/support/scripts/fsdp_async_killed.py under `python -m
trainloop.spawn`: rank 1 is killed inside the background save of step 4 after the loop went on
to step 5, then the job is resumed on 2 ranks.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.checkpoint.async_sharded_workers import DELAY, async_sharded_checks
from tests.support.paths import REPO, SCRIPTS
from trainloop import spawn
from trainloop.checkpoint import checkpoints_in, verify

pytestmark = pytest.mark.multiprocess

KILLED = SCRIPTS / "fsdp_async_killed.py"


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[dict, Path]:
    directory = tmp_path_factory.mktemp("async_sharded")
    return spawn.run(async_sharded_checks, str(directory), n=2), directory


def run_killed_script(checkpoints: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "trainloop.spawn", "-n", "2", str(KILLED), str(checkpoints), str(out), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO)


@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, dict]:
    directory = tmp_path_factory.mktemp("async_killed")
    killed = run_killed_script(directory / "ckpt", directory / "unused.pt", "--kill-in-save", "4")
    left = {"committed": [p.name for p in checkpoints_in(directory / "ckpt")],  # before the resumed run saves
            "latest": (directory / "ckpt" / "latest").read_text().strip(),
            "verified": verify(directory / "ckpt" / "step-00000002")["step"]}
    resumed = run_killed_script(directory / "ckpt", directory / "out.pt")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed.stdout.strip().endswith("resumed_from " + str(directory / "ckpt" / "step-00000002"))
    return killed, left, torch.load(directory / "out.pt", weights_only=True)


def assert_identical(weights: dict, expected: dict) -> None:
    assert weights.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(weights[name], value), f"{name} differs"


def test_a_background_sharded_save_returns_while_its_shards_are_still_being_written(job):
    results, _ = job
    assert results["async_done_on_return"] is False  # DCP's write sleeps DELAY s on every rank
    assert results["async_background_seconds"] < DELAY <= results["sync_seconds"]


def test_the_loop_runs_on_while_the_save_writes_and_both_end_bit_identical(job):
    results, directory = job
    checkpoint = directory / "async" / "slow-background"
    assert results["async_result"] == str(checkpoint) and results["async_latest"] == checkpoint.name
    assert verify(checkpoint)["world_size"] == 2 and (checkpoint / ".metadata").is_file()
    # Two optimizer steps changed every weight in place during the write: the staged copies did
    # not, so the run resumed from the checkpoint ends where the uninterrupted one does.
    assert results["resumed_steps"] == results["uninterrupted_steps"] == 9
    assert_identical(results["resumed_weights"], results["uninterrupted_weights"])
    assert_identical(results["async_weights"], results["uninterrupted_weights"])


def test_a_ranks_failed_write_reaches_every_rank_and_commits_nothing(job):
    results, _ = job
    full = "rank 1: OSError: [Errno 28] No space left on device (simulated)"
    assert "fail-retrieved (in the background)" in results["retrieved_error"] and full in results["retrieved_error"]
    # Unretrieved, it is raised on every rank at the next save, which saves nothing ...
    message = results["next_save_error"]
    assert message.startswith("the previous background save failed: rank 0: ") and "rank 1: could not" in message
    assert "fail-unretrieved" in message and full in message
    # ... or at finish.
    assert "fail-at-finish (in the background)" in results["finish_error"] and full in results["finish_error"]
    # Nothing that failed is committed and no partial directory is left behind.
    assert results["entries"] == ["after-retrieved", "latest"]


def test_sigkill_mid_async_sharded_save_keeps_the_previous_checkpoint(killed_then_resumed):
    killed, left, _ = killed_then_resumed
    assert killed.returncode != 0 and "rank 1" in killed.stderr and "exit code -9" in killed.stderr
    # The loop had gone on past the save (step 5 done) when rank 1 died in the middle of it.
    assert "rank 1 step 5" in killed.stdout and "killed in the save of step 4" in killed.stdout
    # Step 4's shards were never committed: step 2 is `latest`, whole, and the only checkpoint.
    assert left == {"committed": ["step-00000002"], "latest": "step-00000002", "verified": 2}


def test_the_run_resumed_after_the_kill_ends_bit_identical_to_the_uninterrupted_run(job, killed_then_resumed):
    results, _ = job
    _, _, resumed = killed_then_resumed
    assert resumed["step"] == results["uninterrupted_steps"] == 9
    assert_identical(resumed["weights"], results["uninterrupted_weights"])


def test_a_tensor_parallel_run_saves_in_the_background_and_resumes_bit_identical(job):
    results, directory = job
    assert results["tp_done_on_return"] is False  # the shards of tp=2 DTensors, written by DCP
    assert results["tp_result"] == str(directory / "tp" / "slow-tp") and verify(results["tp_result"])
    assert_identical(results["tp_async_weights"], results["tp_uninterrupted"])
    assert_identical(results["tp_resumed"], results["tp_uninterrupted"])
