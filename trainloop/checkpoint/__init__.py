"""Checkpoints that never lose work: `save`, `load`, `export`, `verify`, `checkpoints_in`.

The modules, by concern: `api` (the public calls), `manifest` (the format and its checks),
`writing` (a snapshot written into a temporary directory, renamed into place, `latest`),
`reading` (read once, verified, checked for form and fit, restored), `rng` (RNG states),
`files` (the bytes: hashed while written, verified when read), `staging` (background saves and
the run's writer), `distcp` (sharded state through torch.distributed.checkpoint, read safely).
"""

from trainloop.checkpoint.api import checkpoints_in, export, finish_saves, load, save, verify
from trainloop.checkpoint.manifest import FORMAT_VERSION
from trainloop.errors import CheckpointError, CheckpointWarning, PreviousSaveFailed

__all__ = ["FORMAT_VERSION", "CheckpointError", "CheckpointWarning", "PreviousSaveFailed", "checkpoints_in",
           "export", "finish_saves", "load", "save", "verify"]
