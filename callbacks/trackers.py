"""Experiment trackers: the metrics `tl.log` reports, where users already look.

A tracker is a callback on `on_log` (main process only, cross-rank means as plain floats) and
`on_finish`. `Tracker` does the bookkeeping once for all of them:

- One tracker run per job, never one per rank: only the main process creates files or runs.
  Building a tracker on every rank is fine and creates nothing; it only checks early that the
  library is installed and the directory it will write to can be written.
- The run is created lazily, at the first report, with the run's settings recorded once
  (`state.to_dict()` without the counters, which are the metrics' x axis, not settings). Lazily
  because a `Checkpoint` may restore the tracker in its `on_prepare`, before or after this
  callback's own: by the first report, whether this is a new run or a resumed one is known.
- Resume: `state_dict()` holds the last step logged and what the library needs to find the run
  again (the W&B run id, the MLflow run id). A tracker restored with `load_state_dict` continues
  that run from the checkpoint's step, and no step is recorded twice: what a crashed run logged
  after its checkpoint is replaced where the store can drop it (TensorBoard, JSONLines) and
  kept, not logged again, where it cannot (MLflow; W&B online).
- Non-finite values (NaN, inf) are recorded as they are: a diverging run should be visible.
  JSON has no NaN, so `JSONLines` writes them as the strings "NaN", "Infinity", "-Infinity".

A new tracker implements three methods: `start(config, resume_step)`, `log(metrics, step)` and
`close()` (see docs/trackers.md for one in about 30 lines), and `record_hparams(hparams)` to
record `tl.log_hparams`. The base class and its helpers live in `tracker_base`, the file trackers
(`JSONLines`, `CSV`) in `metric_files`; this module has the library-backed ones and names all.
"""


from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainloop.callbacks.metric_files import CSV, JSONLines
from trainloop.callbacks.tracker_base import Tracker, check_writable, flat_hparams, require, run_config
from trainloop.callbacks.tracker_checks import check_mlflow_server, check_wandb_credentials

if TYPE_CHECKING:
    from trainloop import RunState

__all__ = ["CSV", "JSONLines", "MLflow", "TensorBoard", "Tracker", "WandB", "check_writable", "flat_hparams",
           "require", "run_config"]

_RUN_KEY = "trainloop.run_key"  # the MLflow tag that finds a run before its id is saved


class TensorBoard(Tracker):
    """TensorBoard event files in `logdir`, written by `torch.utils.tensorboard.SummaryWriter`.

    Each metric is a scalar at its step. The run's settings are recorded at the start as
    hparams (the HPARAMS tab) and as JSON text under `config` (the TEXT tab). Events are
    flushed at every report, so a crash loses nothing already reported.

    Resume: the restored run writes a new event file in the same `logdir` with `purge_step` at
    its first report, so TensorBoard discards what a crashed run logged after the checkpoint and
    shows the resumed run's values there instead. `tl.log_hparams` before the first report adds
    to the HPARAMS tab (nested names dotted: `model.width`); TensorBoard shows only a run's first
    hparams record, so hparams given later are written as JSON text under `hparams` (TEXT tab).
    Needs `trainloop-torch[tensorboard]`.
    """

    def __init__(self, logdir: str | os.PathLike = "runs"):
        require("tensorboard", "tensorboard", "TensorBoard")
        self.logdir = check_writable(logdir, "TensorBoard logdir", directory=True)
        self._writer = None

    def start(self, config: dict[str, Any], resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        existing = list(self.logdir.glob("events.out.tfevents.*"))
        # A resumed run recorded its config when it began, unless it never wrote anything.
        recorded = resume_step is not None and bool(existing)
        if resume_step is not None:
            _after_every_event_file(existing)
        self._writer = SummaryWriter(str(self.logdir), purge_step=resume_step)
        self._in_record = flat_hparams(self.hparams)
        if not recorded:
            self._record_config({**config, **self._in_record})
            self._writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", global_step=0)

    def _record_config(self, values: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        # Written into this writer's own file: `SummaryWriter.add_hparams` would open a second
        # run in a sub-directory, and TensorBoard would list two runs for one.
        plain = {name: v if isinstance(v, (bool, int, float, str)) else str(v) for name, v in values.items()}
        for summary in hparams(plain, {}):
            self._writer.file_writer.add_summary(summary)

    def record_hparams(self, hparams: dict[str, Any]) -> None:
        # TensorBoard shows a run's first hparams record only, the one `start` wrote (with the
        # hparams given by then). Any given later go to the TEXT tab, all of them, as JSON.
        if flat_hparams(hparams) == self._in_record:
            return
        text = "```\n" + json.dumps(hparams, indent=2) + "\n```"
        self._writer.add_text("hparams", text, global_step=self.last_step or 0)
        self._writer.flush()

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
        self._writer = None

    def __repr__(self) -> str:
        return f"TensorBoard({str(self.logdir)!r})"


def _after_every_event_file(files: list[Path]) -> None:
    """Wait, if need be, until the second after the newest event file's.

    TensorBoard reads a logdir's event files in name order, and a name is
    `events.out.tfevents.<whole seconds>.<host>.<pid>.<counter>`: a resumed run's file made in
    the same second by the same process (runs in a row, tests) can sort before the older one
    (counter 10 before 9), and its purge would then hide its own values instead of the crashed
    run's.
    """
    newest = max((int(f.name.split(".")[3]) for f in files if f.name.split(".")[3].isdigit()), default=0)
    while int(time.time()) <= newest:
        time.sleep(0.05)


class WandB(Tracker):
    """A Weights & Biases run: `wandb.init(project=project, **init_kwargs)` at the first report.

    `init_kwargs` go to `wandb.init` as they are (`entity`, `name`, `tags`, `dir`, `mode`, `id`,
    ...); a `config=` there is merged over the run's settings. Offline mode is W&B's own:
    `WANDB_MODE=offline` or `mode="offline"` (then `wandb sync` uploads later). Each tracker owns
    its run (`reinit="create_new"`), so two runs in one process do not share one.

    Resume: the run id is chosen when the tracker is built and saved in checkpoints, so even a
    checkpoint taken before the first report knows the run. The run is always opened with
    `wandb.init(id=run_id, resume="allow")`: created the first time, continued after a restore,
    from the checkpoint's step on (settings that changed, e.g. the world size, are updated).
    Online, W&B ignores steps below the run's current step, so what a crashed run logged after
    the checkpoint keeps its first values. Offline, each process writes its own run directory
    under the same id; `wandb sync` merges them. `tl.log_hparams` updates the config.

    Online, `tl.prepare` checks that this machine has W&B credentials (WANDB_API_KEY, or the
    netrc entry `wandb login` writes) and raises PermissionError naming the fix if not, rather
    than letting the first report fail mid-run. Needs `trainloop-torch[wandb]`.
    """

    def __init__(self, project: str | None = None, **init_kwargs: Any):
        self._wandb = require("wandb", "wandb", "WandB")
        self.project = project
        # W&B writes under dir=, else $WANDB_DIR, else the working directory.
        where = check_writable(init_kwargs.get("dir") or os.environ.get("WANDB_DIR") or ".", "W&B dir",
                               directory=True)
        if init_kwargs.get("dir"):
            init_kwargs["dir"] = str(where)  # `~` and $VARIABLES expanded
        # Chosen here rather than by W&B at the first report, so that a checkpoint taken before
        # it already names the run (W&B accepts any id of letters and digits).
        self.run_id: str = init_kwargs.pop("id", None) or uuid.uuid4().hex[:12]
        self.init_kwargs = init_kwargs
        self._run = None

    def start(self, config: dict[str, Any], resume_step: int | None) -> None:
        user_config = self.init_kwargs.get("config") or {}
        self._run = self._wandb.init(**{
            "project": self.project, "reinit": "create_new", **self.init_kwargs,
            "id": self.run_id, "resume": "allow", "allow_val_change": True,
            "config": {**config, **user_config},
        })

    def on_prepare(self, state: RunState) -> None:
        # Online without credentials, wandb.init would raise at the first report, mid-run.
        if state.is_main and not self._started:
            check_wandb_credentials(self.init_kwargs)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def record_hparams(self, hparams: dict[str, Any]) -> None:
        self._run.config.update(hparams, allow_val_change=True)

    def close(self) -> None:
        self._run.finish()
        self._run = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "run_id": self.run_id}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.run_id = state_dict["run_id"]

    def __repr__(self) -> str:
        return f"WandB(project={self.project!r})"


class MLflow(Tracker):
    """An MLflow run in `experiment`: the settings as params, each metric with its step.

    Where: `tracking_uri` if given, else `$MLFLOW_TRACKING_URI`, else a local SQLite store
    `sqlite:///<dir>/mlflow.db` with artifacts in `<dir>/artifacts` (`dir` defaults to
    `./mlruns`; browse it with `mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db`).
    SQLite, not MLflow's file store, because recent MLflow refuses `file:` stores unless
    `MLFLOW_ALLOW_FILE_STORE=true` is set. The client API is used, not `mlflow.start_run`, so no
    process-wide "active run" is touched. MLflow's SQL stores clamp inf to +-1.8e308; NaN is kept.

    Resume: the run id is saved in checkpoints; a restored tracker reopens that run (status back
    to RUNNING) and logs the settings it does not hold yet (params cannot change in MLflow). A
    checkpoint taken before the first report has no run id yet; the run is then found by the
    `trainloop.run_key` tag the tracker gives it. MLflow cannot delete metric points, so steps a
    crashed run already logged after the checkpoint are not logged again (they keep their first
    values): no step appears twice. `tl.log_hparams` adds params (nested names dotted); a param
    cannot change its value. An http(s) `tracking_uri` that nothing answers on fails at
    `tl.prepare` (ConnectionError naming it), not at the first report. Needs `trainloop-torch[mlflow]`.
    """

    def __init__(self, experiment: str = "trainloop", tracking_uri: str | None = None,
                 dir: str | os.PathLike = "mlruns"):
        require("mlflow", "mlflow", "MLflow")
        self.experiment = experiment
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        self._local_store: Path | None = None
        if self.tracking_uri is None:
            self._local_store = check_writable(dir, "MLflow dir", directory=True)
            self.tracking_uri = f"sqlite:///{self._local_store / 'mlflow.db'}"
        self.run_id: str | None = None  # MLflow's, known once the run exists
        self.run_key = uuid.uuid4().hex  # ours, known from the start: finds the run without its id
        self._client = None
        self._held_steps: set[int] = set()  # steps a crashed run already logged after the checkpoint

    def start(self, config: dict[str, Any], resume_step: int | None) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        if self._local_store is not None:
            self._local_store.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its folder
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment_id = self._experiment_id()
        if resume_step is not None and self.run_id is None:
            found = self._client.search_runs([experiment_id], f"tags.`{_RUN_KEY}` = '{self.run_key}'")
            self.run_id = found[0].info.run_id if found else None
        if self.run_id is None:
            self.run_id = self._client.create_run(experiment_id, tags={_RUN_KEY: self.run_key}).info.run_id
        else:
            self._client.update_run(self.run_id, status="RUNNING")
            self._held_steps = self._steps_from(resume_step)
        recorded_params = self._client.get_run(self.run_id).data.params
        self._client.log_batch(self.run_id, params=[
            Param(name, str(value)) for name, value in config.items() if name not in recorded_params])

    def on_prepare(self, state: RunState) -> None:
        # An unreachable server would fail the first report, mid-run, after MLflow's retries.
        if state.is_main and not self._started:
            check_mlflow_server(self.tracking_uri)

    def record_hparams(self, hparams: dict[str, Any]) -> None:
        from mlflow.entities import Param

        recorded = self._client.get_run(self.run_id).data.params
        new = []
        for name, value in flat_hparams(hparams).items():
            if name not in recorded:
                new.append(Param(name, str(value)))
            elif recorded[name] != str(value):
                raise ValueError(f"MLflow: param {name!r} is recorded as {recorded[name]!r} and cannot change "
                                 f"to {str(value)!r} (MLflow params are fixed): use another name")
        if new:
            self._client.log_batch(self.run_id, params=new)

    def _experiment_id(self) -> str:
        found = self._client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        artifact_location = None if self._local_store is None else (self._local_store / "artifacts").as_uri()
        return self._client.create_experiment(self.experiment, artifact_location=artifact_location)

    def _steps_from(self, first: int) -> set[int]:
        names = self._client.get_run(self.run_id).data.metrics
        return {m.step for name in names for m in self._client.get_metric_history(self.run_id, name)
                if m.step >= first}

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if step in self._held_steps:
            return
        timestamp = int(time.time() * 1000)
        self._client.log_batch(
            self.run_id, metrics=[Metric(name, value, timestamp, step) for name, value in metrics.items()])

    def close(self) -> None:
        self._client.set_terminated(self.run_id)
        self._client = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "run_id": self.run_id, "run_key": self.run_key}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.run_id, self.run_key = state_dict["run_id"], state_dict["run_key"]

    def __repr__(self) -> str:
        return f"MLflow(experiment={self.experiment!r}, tracking_uri={self.tracking_uri!r})"
