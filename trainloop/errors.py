"""The exceptions and warnings trainloop raises of its own (beyond ValueError and TypeError).

One module, imported by every layer that raises them and importing nothing of trainloop, so that
a low-level module can raise a checkpoint error without importing the checkpoint machinery.
Each is re-exported where it was first defined (`trainloop.checkpoint.CheckpointError`,
`trainloop.state.StaleStateError`), so older imports keep working.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """A checkpoint could not be written, or is not one that may be loaded (the reason says why)."""


class PreviousSaveFailed(CheckpointError):
    """The background save before this one failed (raised on every rank; this save did not start)."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (damaged) or not written (and `on_error="warn"`)."""


class StaleStateError(ValueError):
    """A trainloop function was given a `RunState` that a later call has superseded."""


class SettingError(ValueError):
    """A setting of the run has a bad value. `setting` names it as `init` takes it (`ddp_bucket_cap_mb`).

    The message names the problem and the way out; where the value came from a `TRAINLOOP_*`
    variable (a spawn flag) it starts with the variable's name.
    """

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting

    def __reduce__(self):  # picklable with its two arguments (a worker's error crosses processes)
        return type(self), (self.setting, str(self))
