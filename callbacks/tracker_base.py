"""What every tracker shares: the `Tracker` base class and the helpers a tracker is built with.

`trainloop.callbacks.trackers` re-exports all of it beside the shipped trackers; its docstring
says what the base class does for them (one run per job, created at the first report, resume).
"""

from __future__ import annotations

import abc
import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from trainloop.extension import expand_path
from trainloop.hooks import Callback

if TYPE_CHECKING:
    from trainloop import RunState


def run_config(state: RunState) -> dict[str, Any]:
    """The run's settings and topology as plain values: what trackers record as the config."""
    config = state.to_dict()
    del config["step"], config["micro_step"]
    return config


def require(module: str, extra: str, tracker: str) -> ModuleType:
    """Import an optional library, or fail naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{tracker} needs the {module} package: pip install 'trainloop-torch[{extra}]'"
        ) from error


def check_writable(path: str | os.PathLike, what: str, *, directory: bool) -> Path:
    """The absolute `path` (`~` and `$VARIABLES` expanded), after checking that it could be
    created and written; creates nothing.

    Raises NotADirectoryError (or IsADirectoryError) when `path` or a parent is a file where a
    directory is needed (or the other way round), PermissionError when the directory that would
    hold it cannot be written. Nothing is created here: trackers are built on every rank, and
    only the main process writes, later.
    """
    path = expand_path(path, what).absolute()
    if path.exists():
        if directory and not path.is_dir():
            raise NotADirectoryError(f"{what} {path} is a file, not a directory")
        if not directory and path.is_dir():
            raise IsADirectoryError(f"{what} {path} is a directory, not a file")
    existing = path if directory and path.exists() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{what} {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {path} is not writable: no write permission on {existing}")
    if path.is_file() and not os.access(path, os.W_OK):
        raise PermissionError(f"{what} {path} is not writable: the file is read-only")
    return path


class Tracker(Callback, abc.ABC):
    """Base of the experiment trackers: subclasses implement `start`, `log` and `close`
    (and `record_hparams`, to record `tl.log_hparams`).

    The hooks call them on the main process only: `start` once, at the first report; `log` at
    every report, with steps that never decrease (`tl.finish` reports the values logged after the
    last report at the current step, which may be that report's); `close` at `tl.finish`, if the
    run started.
    `last_step` is the last step logged (None before any); it is saved in checkpoints with
    whatever a subclass adds to `state_dict`. A subclass keeps the identity of its run in
    `state_dict` from the start, before the first report: a checkpoint may come first.
    """

    last_step: int | None = None
    _started: bool = False
    _restored: bool = False
    _hparams: dict[str, Any] | None = None  # what `tl.log_hparams` gave, merged

    @abc.abstractmethod
    def start(self, config: dict[str, Any], resume_step: int | None) -> None:
        """Create the run and record `config` (the run's settings, plain values).

        `resume_step` is None for a new run. For a tracker restored by `load_state_dict` it is the
        step of this process's first report: reopen the saved run (or create it, if the saved
        job never reported), and drop what the store holds from `resume_step` on: a crashed
        run's reports after the checkpoint, which this run reports again. A store that cannot
        drop them skips logging the steps it already holds instead.
        """

    @abc.abstractmethod
    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record `metrics` (name -> float, NaN and inf included) at `step`."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush and close the run."""

    def record_hparams(self, hparams: dict[str, Any]) -> None:
        """Record the hyper-parameters given to `tl.log_hparams` so far (all of them, merged),
        after `start`. Values are plain (numbers, strings, bools, None, lists, nested mappings:
        `flat_hparams` makes them one level deep). The default records nothing."""

    @property
    def hparams(self) -> dict[str, Any]:
        """Every hyper-parameter `tl.log_hparams` gave this tracker, merged (later calls win)."""
        return dict(self._hparams or {})

    def on_log(self, state: RunState, metrics: dict[str, float]) -> None:
        if not self._started:
            self.start(run_config(state), state.step if self._restored else None)
            self._started = True
            if self._hparams:  # given before the run existed
                self.record_hparams(self.hparams)
        self.log(metrics, state.step)
        self.last_step = state.step

    def on_log_hparams(self, state: RunState, hparams: dict[str, Any]) -> None:
        self._hparams = {**(self._hparams or {}), **hparams}
        if self._started:
            self.record_hparams(self.hparams)

    def on_finish(self, state: RunState) -> None:
        if self._started:
            self._started = False
            self.close()

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = state_dict["last_step"]
        self._restored = True




def flat_hparams(hparams: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted names (`{"model": {"width": 8}}` -> `{"model.width": 8}`), for
    the stores whose parameters are one level deep (TensorBoard's hparams, MLflow params)."""
    flat: dict[str, Any] = {}
    for name, value in hparams.items():
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{prefix}{name}."))
        else:
            flat[prefix + name] = value
    return flat
