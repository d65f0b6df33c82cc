"""The end of a run: a script that never calls `tl.finish`, and `finish` as cleanup.

A save in flight when the interpreter exits completes (or the process says so and exits
non-zero), and a run that was not finished is finished at exit (one process) or warned about,
naming what was lost (several: no collective runs at exit). `finish` accepts any state of its
run and never masks the exception in flight.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import trainloop as tl
from tests.support.paths import SCRIPTS
from tests.support.reference import mse, regression_data, tiny_model
from trainloop.callbacks import Callback, Checkpoint, JSONLines
from trainloop.checkpoint import verify

UNFINISHED = SCRIPTS / "unfinished.py"


def run_unfinished(directory: Path, *args: str, spawn_n: int | None = None) -> subprocess.CompletedProcess:
    launcher = ["-m", "trainloop.spawn", "-n", str(spawn_n)] if spawn_n else []
    return subprocess.run([sys.executable, *launcher, str(UNFINISHED), str(directory), *args],
                          capture_output=True, text=True, timeout=240)


def latest(directory: Path) -> str:
    return (directory / "latest").read_text().strip()


@pytest.mark.slow  # starts a process
def test_a_background_save_in_flight_when_the_script_ends_is_written(tmp_path):
    done = run_unfinished(tmp_path, "--direct")
    assert done.returncode == 0, done.stderr
    assert verify(tmp_path / "step-1")["step"] == 0  # written, hashed and committed
    assert done.stderr.count("tl.finish") == 1, done.stderr  # one warning: the run was not finished


@pytest.mark.slow  # starts a process
def test_a_run_that_ends_without_finish_is_finished_at_exit_with_one_warning(tmp_path):
    done = run_unfinished(tmp_path, "--slow-write", "0.02")
    assert done.returncode == 0, done.stderr
    assert latest(tmp_path) == "step-00000012"  # the final checkpoint, as tl.finish would write it
    assert verify(tmp_path / "step-00000010")["step"] == 10  # the save in flight was completed
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 12  # the last report reached the tracker, and its file was closed
    assert done.stderr.count("tl.finish") == 1, done.stderr
    assert "finished at exit" in done.stderr, done.stderr


@pytest.mark.slow  # starts a process
def test_a_save_that_fails_at_exit_says_so_and_exits_non_zero(tmp_path):
    done = run_unfinished(tmp_path, "--fail-last-save")
    assert done.returncode != 0, done.stderr
    assert "could not write checkpoint" in done.stderr and "step-00000010" in done.stderr, done.stderr
    assert latest(tmp_path) == "step-00000005"


@pytest.mark.multiprocess
def test_under_spawn_the_save_in_flight_completes_and_the_loss_is_named(tmp_path):
    direct = tmp_path / "direct"
    done = run_unfinished(direct, "--direct", spawn_n=2)
    assert done.returncode == 0, done.stderr
    assert verify(direct / "step-1")["step"] == 0
    run = tmp_path / "run"
    done = run_unfinished(run, spawn_n=2)
    assert done.returncode == 0, done.stderr
    # Several processes: nothing collective runs at exit, so the final checkpoint (step 12) is
    # not written; the save of step 10 is this process's own and completes. One warning, on
    # the main process, names the call that was missing and what was lost.
    assert latest(run) == "step-00000010" and verify(run / "step-00000010")["step"] == 10
    assert done.stderr.count("without tl.finish") == 1, done.stderr
    assert "final checkpoint" in done.stderr and "Checkpoint" in done.stderr, done.stderr


# -- finish is cleanup ---------------------------------------------------------------------


class FailsAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step(self, state):
        if state.step == self.step:
            raise RuntimeError(f"callback failed at step {state.step}")


def prepared(tmp_path, *callbacks):
    state = tl.init(seed=0, log_every=1, callbacks=[Checkpoint(tmp_path / "ckpt", every=100),
                                                    JSONLines(tmp_path / "metrics.jsonl"), *callbacks])
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state, model, optimizer, loader = tl.prepare(state, model, optimizer, DataLoader(regression_data(32), batch_size=4))
    return state, model, optimizer, iter(loader)


def test_finish_in_finally_ends_the_run_from_the_newest_state_and_keeps_the_error(tmp_path):
    state, model, optimizer, batches = prepared(tmp_path, FailsAt(3))
    with pytest.raises(RuntimeError, match="callback failed at step 3"):
        try:
            for _ in range(5):
                loss = mse(model, *next(batches))
                state = tl.log(tl.step(tl.backward(state, loss), optimizer), loss=loss)
        finally:
            tl.finish(state)  # `state` is step 2's: tl.step of step 3 superseded it, then raised
    assert state.step == 2
    # Ended from the newest state: the optimizer had stepped a third time.
    assert latest_step(tmp_path / "ckpt") == 3
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 2  # the tracker was closed with every report made
    with pytest.raises(tl.StaleStateError if hasattr(tl, "StaleStateError") else ValueError, match="ended"):
        tl.step(state, optimizer)  # the run is over


def latest_step(directory: Path) -> int:
    return verify(directory / latest(directory))["step"]


class FailsToClose(Callback):
    def on_finish(self, state):
        raise OSError("tracker could not close")


def test_an_error_inside_finish_never_masks_the_exception_in_flight(tmp_path):
    state, *_ = prepared(tmp_path, FailsToClose())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(KeyError, match="the user's error"):
            try:
                raise KeyError("the user's error")
            finally:
                tl.finish(state)
    assert any("tracker could not close" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert latest_step(tmp_path / "ckpt") == 0  # the cleanup went on past the failing hook
    with pytest.raises(OSError, match="tracker could not close"):
        tl.finish(prepared(tmp_path / "again", FailsToClose())[0])  # nothing in flight: raised


def test_finish_twice_is_harmless(tmp_path):
    state, *_ = prepared(tmp_path)
    tl.finish(state)
    tl.finish(state)  # cleanup may run twice (a finally after an explicit finish)


@pytest.mark.multiprocess
def test_finish_with_an_exception_in_flight_on_two_ranks_starts_no_collective(tmp_path):
    from tests.core.run_end_workers import finish_in_finally
    from trainloop import spawn

    (tmp_path / "results").mkdir()
    spawn.run(finish_in_finally, str(tmp_path / "ckpt"), str(tmp_path / "results"), n=2)
    results = [json.loads((tmp_path / "results" / f"rank-{rank}.json").read_text()) for rank in range(2)]
    for result in results:
        assert result["caught"] == "callback failed at step 3" and result["finished"], result
    assert len(results[0]["warnings"]) == 1 and "no collective is started" in results[0]["warnings"][0], results
    assert "the final checkpoint at step 3" in results[0]["warnings"][0]
    assert results[1]["warnings"] == []
    assert latest(tmp_path / "ckpt") == "step-00000002" and verify(tmp_path / "ckpt" / "step-00000002")["step"] == 2
