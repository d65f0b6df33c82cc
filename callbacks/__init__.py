"""Callbacks: composable pieces of a run (checkpoints, trackers, progress, precision).

Importing this package is cheap: each tracker imports its library only when it is built.
"""

from trainloop.callbacks.base import Callback
from trainloop.callbacks.precision import ClipGradNorm, LossScale

__all__ = ["Callback", "ClipGradNorm", "LossScale"]
