"""The exceptions and warnings trainloop raises of its own, exported at the top level (`tl.CheckpointError`).

Every error derives from `TrainloopError` (catch that for "anything trainloop refused") and from
the builtin it refines, so code that catches `ValueError` keeps catching a stale state. One
module, importing nothing of trainloop, so that any layer can raise them.
"""

from __future__ import annotations


class TrainloopError(Exception):
    """The base of every error trainloop raises of its own."""


class CheckpointError(TrainloopError):
    """A checkpoint could not be written, or is not one that may be loaded (the reason says why)."""


class PreviousSaveFailed(CheckpointError):
    """The background save before this one failed (raised on every rank; this save did not start)."""


class StaleStateError(TrainloopError, ValueError):
    """A trainloop function was given a `RunState` that a later call has superseded."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (damaged) or not written (and `on_error="warn"`)."""


class SettingError(TrainloopError, ValueError):
    """A setting of the run has a bad value. `setting` names it as `init` takes it (`ddp_bucket_cap_mb`).

    The message names the problem and the way out; where the value came from a `TRAINLOOP_*`
    variable (a spawn flag) it starts with the variable's name.
    """

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting

    def __reduce__(self):  # picklable with its two arguments (a worker's error crosses processes)
        return type(self), (self.setting, str(self))
