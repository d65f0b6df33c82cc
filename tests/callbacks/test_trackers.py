"""Trackers record what `tl.log` reports, read back with each library's own reader.

Every run goes through the real loop (init, prepare, backward, step, log, finish) with real
TensorBoard, W&B (offline) and MLflow (a local SQLite store), all under `tmp_path`.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import attrs
import pytest
import torch

import trainloop as tl
from tests.support.paths import SCRIPTS
from tests.support.tracking import (
    check_two_rank_tracking,
    expected_reports,
    mlflow_client,
    mlflow_run_ids,
    read_jsonlines,
    read_mlflow,
    read_tensorboard,
    read_wandb,
    value_at,
)
from trainloop.callbacks import Callback, JSONLines, MLflow, TensorBoard, Tracker, WandB


@pytest.fixture(autouse=True)
def _wandb_offline(tmp_path, monkeypatch):
    """W&B writes offline under tmp_path, quietly, and never reaches the network.

    wandb reads its environment once per process, at the first `wandb.init`, so every test sets
    the same values and gives its own directory as `dir=` (see `wandb_tracker`).
    """
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def wandb_tracker(tmp_path: Path, **init_kwargs) -> WandB:
    return WandB(project="tracker-test", dir=str(tmp_path / "wandb"), **init_kwargs)


def train(callbacks, *, steps: int, log_every: int = 1, start_step: int = 0, rank: int = 0,
          extra=None) -> tl.RunState:
    """The real loop on a tiny model; logs `loss=value_at(step)` after every optimizer step.

    `start_step` stands in for a checkpoint restore (the Checkpoint callback is not used
    here): the run continues from that step. `extra(step)` adds more metrics.
    """
    state = tl.init(log_every=log_every, callbacks=callbacks)
    if rank:
        state = state.evolve(topology=attrs.evolve(state.topology, rank=rank))
    model = torch.nn.Linear(2, 1)
    state, model, optimizer = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.0))
    state = state.evolve(step=start_step, logged_step=start_step)
    x = torch.ones(4, 2)
    for _ in range(steps):
        state = tl.backward(state, model(x).pow(2).mean())
        state = tl.step(state, optimizer)
        state = tl.log(state, loss=torch.tensor(value_at(state.step)), **(extra(state.step) if extra else {}))
    tl.finish(state)
    return state




@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> Path:
    """One MLflow store for the module: creating its SQLite schema takes a second or more."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def experiment(request) -> str:
    """The test's own MLflow experiment in the shared store."""
    return request.node.name


# -- what each tracker records -------------------------------------------------------------------

def test_jsonlines_records_the_logged_means_at_their_steps(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    train([JSONLines(path)], steps=11, log_every=3)
    lines = read_jsonlines(path)
    assert {line["step"]: line["loss"] for line in lines} == expected_reports(1, 11, 3)
    assert [line["step"] for line in lines] == [3, 6, 9, 11]  # finish flushes the short rest


def test_tensorboard_event_files_hold_the_logged_means_and_the_config(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    train([TensorBoard(tmp_path / "tb")], steps=10, log_every=2)
    assert dict(read_tensorboard(tmp_path / "tb")) == expected_reports(1, 10, 2)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["log_every"].number_value == 2 and hparams["precision"].string_value == "fp32"
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"log_every": 2' in text
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow  # MLflow runs git
def test_mlflow_records_params_and_metric_history_with_steps(mlflow_store, experiment):
    train([MLflow(experiment=experiment, dir=mlflow_store)], steps=9, log_every=2)
    [run_id] = mlflow_run_ids(mlflow_store, experiment)
    assert read_mlflow(mlflow_store, run_id) == sorted(expected_reports(1, 9, 2).items())
    run = mlflow_client(mlflow_store).get_run(run_id)
    assert run.data.params["log_every"] == "2" and run.data.params["world_size"] == "1"
    assert "step" not in run.data.params  # counters are the x axis, not settings
    assert run.info.status == "FINISHED"


@pytest.mark.slow  # W&B starts its service process
def test_wandb_offline_run_records_config_and_metrics(tmp_path):
    tracker = wandb_tracker(tmp_path, mode="offline", config={"lr": 0.5})
    train([tracker], steps=8, log_every=2)
    [run] = read_wandb(tmp_path / "wandb")
    assert run["id"] == tracker.run_id
    assert run["config"]["lr"] == 0.5 and run["config"]["log_every"] == 2
    assert dict(run["history"]) == expected_reports(1, 8, 2)


@pytest.mark.slow  # W&B's service, MLflow's git
def test_trackers_record_nan_and_inf_as_they_are(tmp_path, mlflow_store, experiment):
    def odd(step):
        return {"odd": [float("nan"), float("inf"), float("-inf"), 1.0][step - 1]}

    train([JSONLines(tmp_path / "m.jsonl"), TensorBoard(tmp_path / "tb"),
           MLflow(experiment=experiment, dir=mlflow_store)],
          steps=4, extra=odd)
    written = [line["odd"] for line in read_jsonlines(tmp_path / "m.jsonl")]
    assert written == ["NaN", "Infinity", "-Infinity", 1.0]  # JSON has no NaN: strings float() reads
    assert "NaN" in (tmp_path / "m.jsonl").read_text().splitlines()[0]
    tensorboard = [value for _, value in read_tensorboard(tmp_path / "tb", "odd")]
    assert math.isnan(tensorboard[0]) and tensorboard[1:] == [math.inf, -math.inf, 1.0]
    [run_id] = mlflow_run_ids(mlflow_store, experiment)
    mlflow = [value for _, value in read_mlflow(mlflow_store, run_id, "odd")]
    # MLflow's SQL store clamps inf to the largest double; NaN is kept.
    assert math.isnan(mlflow[0]) and mlflow[1:] == [sys.float_info.max, -sys.float_info.max, 1.0]


# -- resume --------------------------------------------------------------------------------------

class Restore(Callback):
    """What a Checkpoint callback does for a tracker: `load_state_dict` in its `on_prepare`."""

    def __init__(self, tracker: Callback, saved: dict):
        self.tracker, self.saved = tracker, saved

    def on_prepare(self, state):
        self.tracker.load_state_dict(self.saved)


class SaveAt(Callback):
    """Takes `tracker.state_dict()` when the run reaches `step`, as a checkpoint would."""

    def __init__(self, tracker: Callback, step: int):
        self.tracker, self.step, self.saved = tracker, step, None

    def on_step(self, state):
        if state.step == self.step:
            self.saved = self.tracker.state_dict()


def crash_and_resume(make_tracker, *, restore_first: bool = True, log_every: int = 1,
                     save_at: int = 6) -> tuple[Callback, Callback]:
    """Run 1 does steps 1..10 and is checkpointed at `save_at`; run 2 resumes there, to step 12.

    Run 1's reports after `save_at` stand for what a crashed run logged after its last
    checkpoint. The checkpoint is taken in `on_step`, as a Checkpoint callback does: before that
    step's report. `restore_first` puts the restoring callback before the tracker or after it.
    """
    first = make_tracker()
    save = SaveAt(first, step=save_at)
    train([first, save], steps=10, log_every=log_every)
    second = make_tracker()
    restore = Restore(second, save.saved)
    callbacks = [restore, second] if restore_first else [second, restore]
    train(callbacks, steps=12 - save_at, log_every=log_every, start_step=save_at)
    return first, second


# (log_every, save_at): a checkpoint between reports, and one before the first report.
CRASHES = [(1, 6), (4, 2)]


def assert_each_step_once(steps: list[int], log_every: int) -> None:
    assert steps == sorted(set(steps)), f"a step was recorded twice: {steps}"
    assert steps[0] == log_every and steps[-1] == 12  # not from 0 again, and on to the end


@pytest.mark.parametrize("restore_first", [True, False])
@pytest.mark.parametrize("log_every, save_at", CRASHES)
def test_tensorboard_resume_purges_what_a_crashed_run_logged_after_the_checkpoint(
        tmp_path, restore_first, log_every, save_at):
    crash_and_resume(lambda: TensorBoard(tmp_path / "tb"), restore_first=restore_first,
                     log_every=log_every, save_at=save_at)
    recorded = read_tensorboard(tmp_path / "tb")
    assert_each_step_once([step for step, _ in recorded], log_every)
    if log_every == 1:
        assert dict(recorded) == {step: value_at(step) for step in range(1, 13)}
    else:  # run 2 (from step 2) reports at the uninterrupted run's steps 4, 8, 12 and purges from 3;
        # its report at 4 averages only what it logged itself (steps 3 and 4)
        assert dict(recorded) == {4: 3.5, 8: 6.5, 12: 10.5}


@pytest.mark.parametrize("log_every, save_at", CRASHES)
def test_jsonlines_resume_replaces_lines_after_the_checkpoint(tmp_path, log_every, save_at):
    crash_and_resume(lambda: JSONLines(tmp_path / "m.jsonl"), log_every=log_every, save_at=save_at)
    assert_each_step_once([line["step"] for line in read_jsonlines(tmp_path / "m.jsonl")], log_every)


def test_jsonlines_resume_drops_a_line_a_crash_cut_short(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')
    tracker = JSONLines(path)
    tracker.load_state_dict({"last_step": 2})
    train([tracker], steps=2, start_step=2)
    assert read_jsonlines(path) == [{"step": step, "loss": value_at(step)} for step in (1, 2, 3, 4)]


@pytest.mark.slow  # MLflow runs git
@pytest.mark.parametrize("restore_first", [True, False])
@pytest.mark.parametrize("log_every, save_at", CRASHES)
def test_mlflow_resume_continues_the_same_run_without_repeating_steps(
        mlflow_store, experiment, restore_first, log_every, save_at):
    first, second = crash_and_resume(lambda: MLflow(experiment=experiment, dir=mlflow_store),
                                     restore_first=restore_first, log_every=log_every, save_at=save_at)
    assert mlflow_run_ids(mlflow_store, experiment) == [first.run_id] and second.run_id == first.run_id
    assert_each_step_once([step for step, _ in read_mlflow(mlflow_store, first.run_id)], log_every)


@pytest.mark.slow  # W&B starts its service process
@pytest.mark.parametrize("log_every, save_at", CRASHES)
def test_wandb_resume_reopens_the_run_id_and_continues_steps(tmp_path, log_every, save_at):
    first, second = crash_and_resume(lambda: wandb_tracker(tmp_path), log_every=log_every,
                                     save_at=save_at)
    before, after = read_wandb(tmp_path / "wandb")
    assert second.run_id == first.run_id == before["id"] == after["id"]
    # Offline, each process writes its own directory for the run; `wandb sync` merges them.
    resumed_steps = [step for step, _ in after["history"]]
    assert resumed_steps[0] > save_at and resumed_steps[-1] == 12


def test_a_new_tracker_is_three_methods_on_the_base(tmp_path):
    class Recorder(Tracker):
        def __init__(self):
            self.calls = []

        def start(self, config, resume_step):
            self.calls.append(("start", resume_step))

        def log(self, metrics, step):
            self.calls.append(("log", step, metrics["loss"]))

        def close(self):
            self.calls.append(("close",))

    tracker = Recorder()
    train([tracker], steps=4, log_every=2)
    assert tracker.calls == [("start", None), ("log", 2, 1.5), ("log", 4, 3.5), ("close",)]
    assert tracker.state_dict() == {"last_step": 4}
    resumed = Recorder()
    resumed.load_state_dict(tracker.state_dict())
    train([resumed], steps=2, log_every=2, start_step=4)
    assert resumed.calls == [("start", 6), ("log", 6, 5.5), ("close",)]


# -- bad input, missing extras, ranks --------------------------------------------------------------

@pytest.mark.parametrize("tracker, module, extra", [
    (lambda tmp: TensorBoard(tmp), "tensorboard", "tensorboard"),
    (lambda tmp: WandB(project="p"), "wandb", "wandb"),
    (lambda tmp: MLflow(dir=tmp), "mlflow", "mlflow"),
])
def test_a_missing_library_names_the_extra_to_install(tmp_path, monkeypatch, tracker, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # how Python marks a module as not importable
    with pytest.raises(ImportError, match=rf"pip install 'trainloop-torch\[{extra}\]'"):
        tracker(tmp_path)


@pytest.mark.slow  # a fresh interpreter
def test_importing_the_callbacks_imports_no_tracker_library():
    code = ("import sys, trainloop.callbacks; "
            "print(sorted(m for m in ('tensorboard', 'wandb', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("tracker", [
    lambda path: TensorBoard(path),
    pytest.param(lambda path: MLflow(dir=path), marks=pytest.mark.slow),  # MLflow runs git
    lambda path: JSONLines(path / "metrics.jsonl"),
    lambda path: WandB(dir=path),
])
def test_a_directory_that_is_a_file_is_refused_naming_it(tmp_path, tracker):
    blocker = tmp_path / "taken"
    blocker.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="taken"):
        tracker(blocker)
    with pytest.raises(NotADirectoryError, match="taken"):
        tracker(blocker / "below")


def test_a_jsonlines_path_that_is_a_directory_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError, match=re.escape(str(tmp_path))):
        JSONLines(tmp_path)


def unwritable_directory(tmp_path: Path) -> Path:
    """A directory this process may not write: read-only by mode, or under /proc for root."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root ignores permission bits
        return Path("/proc/self")
    return locked


@pytest.mark.parametrize("tracker", [
    lambda path: TensorBoard(path / "runs"),
    pytest.param(lambda path: MLflow(dir=path / "mlruns"), marks=pytest.mark.slow),  # MLflow runs git
    lambda path: JSONLines(path / "metrics.jsonl"),
])
def test_an_unwritable_directory_fails_at_construction(tmp_path, tracker):
    target = unwritable_directory(tmp_path)
    with pytest.raises(PermissionError, match=re.escape(str(target))):
        tracker(target)


@pytest.mark.slow  # MLflow runs git
def test_non_main_ranks_create_nothing(tmp_path):
    trackers = [TensorBoard(tmp_path / "tb"), JSONLines(tmp_path / "m.jsonl"), MLflow(dir=tmp_path / "ml"),
                wandb_tracker(tmp_path)]
    train(trackers, steps=5, log_every=2, rank=1)
    assert list(tmp_path.iterdir()) == []
    assert all(tracker.last_step is None for tracker in trackers)


@pytest.mark.slow  # W&B's service, MLflow's git
def test_check_two_rank_tracking_reads_back_on_one_process(tmp_path):
    seen = check_two_rank_tracking(tmp_path)
    expected = seen.pop("expected")
    assert seen.pop("runs") == {"tensorboard": 1, "jsonlines": 1, "mlflow": 1, "wandb": 1}
    for tracker, recorded in seen.items():
        assert recorded == expected, tracker


@pytest.mark.slow  # a killed child
def test_a_killed_and_resumed_run_continues_the_same_tracker_runs_without_repeating_steps(tmp_path):
    """A real process SIGKILLed mid-run, then started again: it resumes from its checkpoint."""
    script = SCRIPTS / "tracked_run.py"
    command = [sys.executable, str(script), str(tmp_path)]
    job = subprocess.Popen([*command, "--slow", "0.2"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in job.stdout:
        lines.append(line)
        if line.strip() == "step 8":
            job.kill()  # SIGKILL: no finish, no flush, no goodbye
            break
    job.wait(timeout=60)
    assert job.returncode == -9, "".join(lines)
    subprocess.run(command, check=True, timeout=120, capture_output=True)
    every_second_step = list(range(2, 17, 2))  # 16 steps, a report every 2
    assert [step for step, _ in read_tensorboard(tmp_path / "tb")] == every_second_step
    assert [line["step"] for line in read_jsonlines(tmp_path / "metrics.jsonl")] == every_second_step
    [run_id] = mlflow_run_ids(tmp_path / "ml", "killed")
    assert [step for step, _ in read_mlflow(tmp_path / "ml", run_id)] == every_second_step


def test_a_resumed_tensorboard_file_sorts_after_every_older_one(tmp_path):
    # TensorBoard reads event files in name order; names hold whole seconds, then a counter that
    # sorts as text (10 before 9): a resumed writer waits for a second of its own.
    now = int(time.time())
    (tmp_path / f"events.out.tfevents.{now:010d}.host.1.9").write_bytes(b"")
    tracker = TensorBoard(tmp_path)
    tracker.start({}, resume_step=3)
    tracker.close()
    names = sorted(path.name for path in tmp_path.glob("events.out.tfevents.*"))
    assert len(names) == 2 and names[-1] != f"events.out.tfevents.{now:010d}.host.1.9"
    assert int(names[-1].split(".")[3]) > now
