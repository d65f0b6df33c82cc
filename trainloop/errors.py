"""The exceptions trainloop raises of its own (beyond ValueError and TypeError for bad input).

One module, imported by every layer that raises them and by none that it depends on, so that a
low-level module can raise a checkpoint error without importing the checkpoint machinery.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """A checkpoint could not be written, or is not one that may be loaded (the reason says why)."""
