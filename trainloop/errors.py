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
