"""Writing a checkpoint: a snapshot of the run, written into a temporary directory, renamed into place.

Everything is written into a partial directory next to the target, each file and the directory
fsynced, and only then renamed into place (`os.replace`); the `latest` pointer file is replaced the
same way. A process killed at any instant leaves either the previous checkpoint or the new one,
never a mix.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainloop.checkpoint.files import (
    default_hash,
    file_record,
    fsync,
    in_parallel,
    write_file,
    write_safetensors,
)
from trainloop.checkpoint.manifest import LATEST, MANIFEST, _class_name, _manifest, _manifest_body, _model_file
from trainloop.checkpoint.staging import Staging
from trainloop.collectives import broadcast
from trainloop.forwarding import unwrap

if TYPE_CHECKING:
    from trainloop.state import RunState


class _Snapshot:
    """What a checkpoint holds, taken from the run at one instant: written later, perhaps on
    another thread, while the run goes on. `weights` is None for a sharded (FSDP) checkpoint,
    whose shards DCP has written already."""

    def __init__(self, state: RunState, rng: list[dict], sharded_optimizers: list[dict] | None,
                 staging: Staging | None = None):
        stage = staging.tree if staging is not None else (lambda obj, key: obj)
        self.weights = None
        if sharded_optimizers is None:
            self.weights = []
            for index, model in enumerate(state.models):
                tensors, metadata = _weights(unwrap(model))
                self.weights.append((stage(tensors, ("model", index)), metadata))
        optimizers = sharded_optimizers
        if optimizers is None:
            optimizers = [stage(opt.state_dict(), ("optimizer", i)) for i, opt in enumerate(state.optimizers)]
        self.optimization = {"optimizers": optimizers,
                             "schedulers": [stage(sched.state_dict(), ("scheduler", i))
                                            for i, sched in enumerate(state.schedulers)]}
        self.callbacks = {cb.key: stage(cb.state_dict(), ("callback", cb.key)) for cb in state.callbacks}
        self.rng = rng
        self.trainer = stage(_trainer_record(state), ("trainer",))
        self.manifest = _manifest_body(state)
        if staging is not None:
            staging.wait()


def _write(snapshot: _Snapshot, path: Path) -> None:
    """Rank 0: write the checkpoint into the partial directory, hash it, rename it into place.

    For a sharded snapshot the ranks' shards are in the partial directory already.
    """
    partial = _partial_dir(path)
    algorithm = default_hash()
    if snapshot.weights is not None:
        _make_fresh(partial)
    try:
        # What to write, by file name: the files are written side by side, the weights and the
        # optimizer state first (hashing, writing and fsync release the GIL).
        contents: dict[str, Any] = {}
        files: dict[str, dict] = {}
        if snapshot.weights is not None:
            for index, (tensors, metadata) in enumerate(snapshot.weights):
                contents[_model_file(index)] = lambda handle, t=tensors, m=metadata: write_safetensors(handle, t, m)
        else:  # the ranks' DCP files, written by DCP: hashed by reading them back
            shards = sorted(p.name for p in partial.iterdir())
            files.update(in_parallel(_fsynced_record, [partial / name for name in shards], shards))
        contents["optimizer.pt"] = _torch_saver(snapshot.optimization)
        contents["callbacks.pt"] = _torch_saver(snapshot.callbacks)
        contents["rng.pt"] = _torch_saver(snapshot.rng)
        contents["trainer.json"] = json.dumps(snapshot.trainer, indent=1).encode()
        names = list(contents)
        files.update(in_parallel(lambda name: write_file(partial / name, contents[name], algorithm), names, names))
        manifest = _manifest(snapshot.manifest, dict(sorted(files.items())), algorithm)
        write_file(partial / MANIFEST, json.dumps(manifest, indent=1).encode(), algorithm)
        fsync(partial)
        _replace_dir(partial, path)
        _point_latest(path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _partial_dir(path: Path) -> Path:
    return path.parent / f".{path.name}.partial"


def _make_fresh(partial: Path) -> None:
    if partial.exists():
        shutil.rmtree(partial)  # left by a save that was killed
    partial.mkdir(parents=True)


def _write_shards(state: RunState, path: Path) -> tuple[str | None, list[dict] | None]:
    """Every rank: write its FSDP shards into the partial directory (DCP), which rank 0 makes.

    Returns `(error, optimizers' non-tensor state)`, the same on every rank. On many machines the
    directory must be on a filesystem they share: rank 0 then hashes every rank's files.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    from trainloop.checkpoint import distcp

    partial = _partial_dir(path)
    error = None
    if state.is_main:
        try:
            _make_fresh(partial)
        except OSError as failure:
            error = f"could not write checkpoint {path}: {failure}"
    error = broadcast(state, error)  # no rank writes into a directory that is not there
    if error is not None:
        return error, None
    try:
        plain = distcp.save_sharded([unwrap(m) for m in state.models], state.optimizers, partial)
    except (Exception, CheckpointException) as failure:  # DCP raises the same on every rank
        if state.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        return f"could not write checkpoint {path}: {_reason(failure)}", None
    return None, plain


def _reason(failure: BaseException) -> str:
    """The error in a sentence. DCP's CheckpointException prints every failed rank's traceback."""
    failures = getattr(failure, "failures", None)
    if not isinstance(failures, dict):
        return str(failure)
    return "; ".join(f"rank {rank}: {type(error).__name__}: {error}"
                     for rank, (error, _) in sorted(failures.items()))


def _torch_saver(obj: Any) -> Callable[[Any], None]:
    return lambda handle: torch.save(obj, handle)


def _weights(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """The model's tensors as `safetensors.torch.save_model` stores them: a tied weight once,
    under one of its names, the others recorded in the metadata."""
    return _without_duplicates(model.state_dict())


def _without_duplicates(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """`tensors` with each group of names that share storage (tied weights) kept once.

    Only groups of two or more are handed to safetensors' `_remove_duplicate_names`: a lone
    tensor that is a view of a larger storage (a shard gathered into one buffer) is kept as is.
    """
    from safetensors.torch import _remove_duplicate_names

    by_storage: dict[Any, list[str]] = {}
    for name, tensor in tensors.items():
        by_storage.setdefault((tensor.device, tensor.untyped_storage().data_ptr()), []).append(name)
    shared = {name: tensors[name] for names in by_storage.values() if len(names) > 1 for name in names}
    tensors, metadata = dict(tensors), {}
    for kept, removed in _remove_duplicate_names(shared).items():
        for name in removed:
            metadata[name] = kept
            del tensors[name]
    return tensors, metadata or None


def _trainer_record(state: RunState) -> dict[str, Any]:
    return {
        "step": state.step,
        "micro_step": state.micro_step,
        "logged_step": state.logged_step,
        "loaders": [loader.state_dict() for loader in state.loaders],
        # Checked on load before anything is restored: another optimizer's state would load
        # silently and fail at the first step (a scheduler's would not fail at all).
        "classes": {"optimizers": [_class_name(opt) for opt in state.optimizers],
                    "schedulers": [_class_name(sched) for sched in state.schedulers]},
    }


def _fsynced_record(file: Path) -> dict[str, Any]:
    fsync(file)
    return file_record(file)


def _replace_dir(source: Path, target: Path) -> None:
    """Move the finished `source` to `target`, replacing an older `target` only once safe."""
    if not target.exists():
        os.replace(source, target)
    else:
        old = target.parent / f".{target.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    # The parent directory is fsynced once, by _point_latest, for both renames.


def _point_latest(path: Path) -> None:
    pointer = path.parent / LATEST
    temporary = path.parent / f".{LATEST}.partial"
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()  # left by a save that was killed
    write_file(temporary, (path.name + "\n").encode(), None)
    os.replace(temporary, pointer)
    fsync(path.parent)
