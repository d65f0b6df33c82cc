"""Callbacks: composable pieces of a run (checkpoints, trackers, progress, precision).

Importing this package is cheap: each tracker imports its library only when it is built.
"""

from trainloop.hooks import Callback
from trainloop.callbacks.checkpoint import Checkpoint, CheckpointWarning
from trainloop.callbacks.precision import ClipGradNorm, LossScale
from trainloop.callbacks.profile import Profile
from trainloop.callbacks.progress import Progress
from trainloop.callbacks.throughput import Throughput
from trainloop.callbacks.trackers import CSV, JSONLines, MLflow, TensorBoard, Tracker, WandB

__all__ = [
    "CSV", "Callback", "Checkpoint", "CheckpointWarning", "ClipGradNorm", "JSONLines", "LossScale", "MLflow", "Profile", "Progress", "TensorBoard",
    "Throughput", "Tracker", "WandB",
]
