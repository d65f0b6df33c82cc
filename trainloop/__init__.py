"""trainloop: a functional training-loop microframework for PyTorch.

Keep your own loop; call pure functions that take and return an immutable `RunState`:

    state = tl.init(precision="bf16", accumulate=4)
    state, model, optimizer, loader = tl.prepare(state, model, optimizer, loader)
    for batch in loader:
        with tl.accumulate(state, model):
            state = tl.backward(state, loss_fn(model, batch))
        state = tl.step(state, optimizer)
        state = tl.log(state, loss=loss)
    tl.finish(state)
"""

from trainloop._version import __version__
from trainloop.collectives import all_ranks as all  # noqa: F401  (tl.all; see __all__)
from trainloop.collectives import any_rank as any  # noqa: F401  (tl.any; see __all__)
from trainloop.collectives import (
    barrier,
    broadcast,
    gather,
    gather_object,
    main_first,
    pad,
    print,  # noqa: F401  (tl.print; see __all__)
    reduce,
    split,
)
from trainloop.config import Config
from trainloop.data import PreparedLoader
from trainloop.errors import (
    CheckpointError,
    CheckpointWarning,
    PreviousSaveFailed,
    RunEndWarning,
    SettingError,
    StaleStateError,
    TrainloopError,
)
from trainloop.forwarding import mark_forward_method, unwrap
from trainloop.lifecycle import attach, finish, init, log_hparams
from trainloop.preparation import prepare
from trainloop.state import RunState
from trainloop.steps import accumulate, backward, log, no_sync, step
from trainloop.topology import Topology

__all__ = [
    "CheckpointError", "CheckpointWarning", "Config", "PreparedLoader", "PreviousSaveFailed", "RunEndWarning",
    "RunState", "SettingError", "StaleStateError", "Topology", "TrainloopError", "__version__",
    "accumulate", "attach", "backward", "barrier", "broadcast", "empty_weights", "export",
    "find_batch_size", "finish", "gather", "gather_object", "init", "load", "load_weights", "log", "log_hparams",
    "loss_parallel",
    "main_first", "mark_forward_method", "no_sync", "pad", "prepare", "reduce", "save", "split", "step",
    "unwrap",
]  # tl.any, tl.all and tl.print are left out: `from trainloop import *` would shadow the builtins

# Imported on first use, so that `import trainloop` stays light: the checkpoint package (a dozen
# modules), weights, meta-init and tensor parallelism are not needed by every run.
_LAZY = {"save": "trainloop.checkpoint", "load": "trainloop.checkpoint", "export": "trainloop.checkpoint",
         "find_batch_size": "trainloop.data.batch_size", "empty_weights": "trainloop.models.meta",
         "load_weights": "trainloop.models.weights", "loss_parallel": "trainloop.strategies.tensor_parallel"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trainloop' has no attribute {name!r}")
