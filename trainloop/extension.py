"""The whole surface for callback authors, beside the public API (`trainloop`) and the protocol
(`trainloop.hooks`). The shipped callbacks (`trainloop.callbacks`) use nothing else of the core.

- Models: `unwrap` (the user's module inside what `prepare` returned), `wrapper_layers` (every
  layer, outermost first).
- Logging: `report_due(state)` (the next `tl.log` reports), `add_to_report(state, metrics)` (a
  hook's own metrics in that report: return the state it gives).
- Collectives: `collective_device(state)` (where a collective's buffers live).
- Checkpoints: `checkpoints_in(directory)` (committed ones, newest first), `finish_saves(state)`
  (wait for the run's background save, raising its failure on every rank), `fsync(path)`.
- Paths: `expand_path(path, what)` (`~` and `$VARIABLES` expanded; an unset variable refused).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from trainloop.checkpoint.api import checkpoints_in, finish_saves
from trainloop.checkpoint.files import fsync
from trainloop.collectives import collective_device
from trainloop.forwarding import unwrap, wrapper_layers
from trainloop.steps import add_to_report, report_due

__all__ = ["add_to_report", "checkpoints_in", "collective_device", "expand_path", "finish_saves", "fsync",
           "report_due", "unwrap", "wrapper_layers"]

_VARIABLE = re.compile(r"\$(\w+)|\$\{([^}]*)\}")


def expand_path(path: str | os.PathLike, what: str = "path") -> Path:
    """`path` with `~` and `$NAME` / `${NAME}` expanded, as a shell would: what every callback
    does with the paths it takes (`TensorBoard("$SCRATCH/tb")`).

    Raises ValueError naming the variable when one is not set: left as it is, it would become
    a directory literally called `$NAME`. `what` names the path in that message.
    """
    text = os.fspath(path)
    for match in _VARIABLE.finditer(text):
        name = match.group(1) or match.group(2)
        if name not in os.environ:
            raise ValueError(f"{what} {text!r}: ${name} is not set; set it, or write the path out")
    return Path(os.path.expandvars(os.path.expanduser(text)))
