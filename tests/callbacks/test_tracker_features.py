"""The tracker features a newcomer reaches for first, read back from the real files and stores.

A shipped CSV tracker; `tl.log_hparams` reaching every tracker; `tl.log(..., step=)`; `~` and
environment variables in every path a callback takes; trackers that cannot work fail at
`prepare`, naming the fix, not at the first report (issue 19 item 10, issue 21).
"""

from __future__ import annotations

import csv
import json
import math
import socket
from pathlib import Path

import pytest
import torch

import trainloop as tl
from tests.docs.docs_snippets import python_blocks
from tests.support.tracking import finished_records, mlflow_client, mlflow_run_ids, read_tensorboard
from trainloop.callbacks import CSV, Checkpoint, JSONLines, MLflow, Profile, TensorBoard, WandB


@pytest.fixture(autouse=True)
def _quiet_offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _prepared(callbacks, log_every=2):
    state = tl.init(log_every=log_every, callbacks=callbacks)
    model = torch.nn.Linear(2, 1)
    state, model, optimizer = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.0))
    return state, model, optimizer


def _one_step(state, model, optimizer, **metrics):
    state = tl.backward(state, model(torch.ones(1, 2)).pow(2).mean())
    state = tl.step(state, optimizer)
    return tl.log(state, **metrics)


# -- CSV ------------------------------------------------------------------------------------------


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_csv_writes_a_row_per_report_and_widens_its_header_for_a_new_name(tmp_path):
    state, model, optimizer = _prepared([CSV(tmp_path / "metrics.csv")])
    for step in range(1, 7):
        extra = {"accuracy": 0.5} if step > 4 else {}
        state = _one_step(state, model, optimizer, loss=float(step), **extra)
    tl.finish(state)
    rows = _rows(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == ["2", "4", "6"]
    assert [float(r["loss"]) for r in rows] == [1.5, 3.5, 5.5]
    assert [r["accuracy"] for r in rows] == ["", "", "0.5"]  # the column came at step 6


def test_csv_records_nan_and_inf_and_refuses_a_metric_named_step(tmp_path):
    state, model, optimizer = _prepared([CSV(tmp_path / "m.csv")], log_every=1)
    state = _one_step(state, model, optimizer, loss=math.nan, grad=math.inf)
    tl.finish(state)
    [row] = _rows(tmp_path / "m.csv")
    assert math.isnan(float(row["loss"])) and float(row["grad"]) == math.inf
    state, model, optimizer = _prepared([CSV(tmp_path / "n.csv")], log_every=1)
    state = tl.step(tl.backward(state, model(torch.ones(1, 2)).pow(2).mean()), optimizer)
    with pytest.raises(ValueError, match="'step' clashes with the step column"):
        tl.log(state, {"step": 1.0})  # a metric called step (the keyword `step=` is the report's step)


def test_csv_resumes_keeping_the_rows_before_the_checkpoint(tmp_path):
    def run(steps, crash=False):
        checkpoint = Checkpoint(tmp_path / "ckpt", every=2, background=False)  # committed when `crash` comes
        state, model, optimizer = _prepared([CSV(tmp_path / "m.csv"), checkpoint], log_every=1)
        for _ in range(steps):
            state = _one_step(state, model, optimizer, loss=float(state.step + 1))
        if not crash:
            tl.finish(state)
        return state

    run(3, crash=True)  # checkpoint at step 2, then a report at step 3 and a crash
    run(2)  # resumes at step 2: steps 3 and 4 again
    assert [r["step"] for r in _rows(tmp_path / "m.csv")] == ["1", "2", "3", "4"]


# -- log_hparams ----------------------------------------------------------------------------------

HPARAMS = {"lr": 0.1, "model": {"width": 8, "act": "relu"}, "tags": ["a", "b"], "warmup": None}


def _wandb_config(wandb_dir: Path) -> dict:
    """The config of the one offline run: its run record, then every config update."""
    [path] = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    config = {}
    for record in finished_records(path):
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else ()
        for item in updates:
            key = item.key or "/".join(item.nested_key)
            config[key] = json.loads(item.value_json)
    return config


@pytest.mark.slow  # W&B's service, MLflow's git
def test_log_hparams_reaches_every_tracker(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    trackers = [JSONLines(tmp_path / "metrics.jsonl"), CSV(tmp_path / "metrics.csv"), TensorBoard(tmp_path / "tb"),
                MLflow(experiment="hparams", dir=tmp_path / "mlruns"),
                WandB(project="hparams", dir=str(tmp_path / "wandb"), mode="offline")]
    state, model, optimizer = _prepared(trackers)
    assert tl.log_hparams(state, HPARAMS) is state  # before the first report: kept for it
    for step in range(1, 5):
        state = _one_step(state, model, optimizer, loss=float(step))
        if step == 2:
            tl.log_hparams(state, {"seed_note": "after the first report"})
    tl.finish(state)

    for sidecar in ("metrics.hparams.json",):
        recorded = json.loads((tmp_path / sidecar).read_text())
        assert recorded == {**HPARAMS, "seed_note": "after the first report"}
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["lr"].number_value == pytest.approx(0.1) and hparams["model.act"].string_value == "relu"
    assert hparams["precision"].string_value == "fp32"  # the run's settings stay beside them
    # TensorBoard shows a run's first hparams record only: a later hparam is in the TEXT tab.
    assert "seed_note" not in hparams
    late = json.loads(events.Tensors("hparams/text_summary")[-1].tensor_proto.string_val[0].decode().strip("`\n"))
    assert late == {**HPARAMS, "seed_note": "after the first report"}
    assert dict(read_tensorboard(tmp_path / "tb")) == {2: 1.5, 4: 3.5}
    [run_id] = mlflow_run_ids(tmp_path / "mlruns", "hparams")
    params = mlflow_client(tmp_path / "mlruns").get_run(run_id).data.params
    assert params["lr"] == "0.1" and params["model.width"] == "8" and params["tags"] == "['a', 'b']"
    assert params["seed_note"] == "after the first report" and params["log_every"] == "2"
    config = _wandb_config(tmp_path / "wandb")
    assert config["lr"] == 0.1 and config["model"] == {"width": 8, "act": "relu"}
    assert config["seed_note"] == "after the first report" and config["log_every"] == 2


def test_the_trackers_guide_log_hparams_snippet_runs_as_written(tmp_path, monkeypatch):
    [block] = python_blocks("docs/trackers.md", "## Hyper-parameters: `tl.log_hparams`")
    model = torch.nn.Linear(2, 1)
    namespace = {"tl": tl, "TensorBoard": TensorBoard, "CSV": CSV, "model": model,
                 "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
                 "loader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 2)), batch_size=2)}
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "trackers.md", "exec"), namespace)
    state = namespace["state"]
    state = _one_step(state, namespace["model"], namespace["optimizer"], loss=1.0)
    tl.finish(state)
    recorded = json.loads((tmp_path / "runs/exp1/metrics.hparams.json").read_text())
    assert recorded == {"lr": 3e-4, "batch_size": 64, "model": {"width": 512, "depth": 8}}


def test_log_hparams_refuses_what_no_tracker_can_store(tmp_path):
    state, _, _ = _prepared([JSONLines(tmp_path / "m.jsonl")])
    with pytest.raises(TypeError, match=r"log_hparams: 'weights' must be a number, string, bool or None.*Tensor"):
        tl.log_hparams(state, {"weights": torch.ones(2)})
    with pytest.raises(TypeError, match="log_hparams: keys must be strings"):
        tl.log_hparams(state, {1: 2})


# -- log(step=) -----------------------------------------------------------------------------------


def test_log_with_step_reports_at_once_at_that_step(tmp_path):
    state, model, optimizer = _prepared([JSONLines(tmp_path / "m.jsonl")], log_every=4)
    for _ in range(3):
        state = _one_step(state, model, optimizer, loss=1.0)
    state = tl.log(state, step=3, accuracy=torch.tensor(0.75))  # at once, not averaged into the buffer
    state = _one_step(state, model, optimizer, loss=1.0)
    with pytest.raises(ValueError, match=r"log: step=2 is before the last report \(step 4\)"):
        tl.log(state, step=2, accuracy=0.5)
    with pytest.raises(ValueError, match=r"log: step=9 is after the run's step \(4\)"):
        tl.log(state, step=9, accuracy=0.5)
    tl.finish(state)
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert lines == [{"step": 3, "accuracy": 0.75}, {"step": 4, "loss": 1.0}]


# -- paths: ~ and $VARIABLES ----------------------------------------------------------------------


@pytest.mark.slow  # W&B's service, MLflow's git
def test_every_callback_path_expands_home_and_environment_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    callbacks = [JSONLines("$RUNS/m.jsonl"), CSV("${RUNS}/m.csv"), TensorBoard("$RUNS/tb"),
                 MLflow(experiment="paths", dir="~/mlruns"), WandB(project="p", dir="$RUNS/wb", mode="offline"),
                 Checkpoint("$RUNS/ckpt"), Profile("~/profile", wait=0, warmup=0, active=1)]
    state, model, optimizer = _prepared(callbacks)
    for step in range(1, 3):
        state = _one_step(state, model, optimizer, loss=float(step))
    tl.finish(state)
    runs, home = tmp_path / "runs", tmp_path / "home"
    assert (runs / "m.jsonl").is_file() and (runs / "m.csv").is_file()
    assert list((runs / "tb").glob("events.out.tfevents.*")) and (runs / "ckpt" / "latest").is_file()
    assert (home / "mlruns" / "mlflow.db").is_file() and list((runs / "wb").glob("wandb/offline-run-*"))
    assert (home / "profile").is_dir()
    assert not (Path.cwd() / "$RUNS").exists() and not (Path.cwd() / "~").exists()


def test_a_path_naming_an_unset_variable_is_refused_naming_it(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_RUNS_DIR", raising=False)
    with pytest.raises(ValueError, match=r"\$NO_SUCH_RUNS_DIR is not set"):
        JSONLines("$NO_SUCH_RUNS_DIR/m.jsonl")
    with pytest.raises(ValueError, match=r"\$NO_SUCH_RUNS_DIR is not set"):
        Checkpoint("${NO_SUCH_RUNS_DIR}/ckpt")


# -- trackers that cannot work fail at prepare -----------------------------------------------------


@pytest.mark.slow  # W&B's service
def test_wandb_online_without_credentials_fails_at_prepare_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no W&B settings
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(PermissionError, match=r"wandb login.*WANDB_API_KEY.*mode=\"offline\""):
        _prepared([WandB(project="p", dir=str(tmp_path))])
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # a key present: prepare goes on (nothing is sent yet)
    state, _, _ = _prepared([WandB(project="p", dir=str(tmp_path))])
    monkeypatch.setenv("WANDB_MODE", "offline")
    tl.finish(state)


@pytest.mark.slow  # MLflow runs git
def test_an_unreachable_mlflow_server_fails_at_prepare_naming_it(tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(ConnectionError, match=rf"MLflow: the tracking server {uri} cannot be reached"):
        _prepared([MLflow(experiment="x", tracking_uri=uri)])
