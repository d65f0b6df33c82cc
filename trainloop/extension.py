"""The whole surface for callback authors, beside the public API (`trainloop`) and the protocol
(`trainloop.hooks`). The shipped callbacks (`trainloop.callbacks`) use nothing else of the core.

- Models: `unwrap` (the user's module inside what `prepare` returned), `wrapper_layers` (every
  layer, outermost first).
- Logging: `report_due(state)` (the next `tl.log` reports), `add_to_report(state, metrics)` (a
  hook's own metrics in that report: return the state it gives).
- Collectives: `collective_device(state)` (where a collective's buffers live).
- Checkpoints: `checkpoints_in(directory)` (committed ones, newest first), `finish_saves(state)`
  (wait for the run's background save, raising its failure on every rank), `fsync(path)`.
"""

from trainloop.checkpoint.api import checkpoints_in, finish_saves
from trainloop.checkpoint.files import fsync
from trainloop.collectives import collective_device
from trainloop.forwarding import unwrap, wrapper_layers
from trainloop.steps import add_to_report, report_due

__all__ = ["add_to_report", "checkpoints_in", "collective_device", "finish_saves", "fsync", "report_due",
           "unwrap", "wrapper_layers"]
