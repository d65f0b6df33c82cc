"""Checkpoints that never lose work: `save`, `load`, `export`.

A checkpoint is a directory:

    step-00000500/
        manifest.json        format version, versions, counters, settings, the hash algorithm,
                             the size and hash of every other file (and a hash of itself)
        model.safetensors    the weights (model-1.safetensors, ... for further models)
        optimizer.pt         the optimizers' and schedulers' state dicts } torch.save; loaded
        callbacks.pt         each callback's state_dict, by its key      } with weights_only=True
        rng.pt               every rank's RNG states (Python, NumPy, torch CPU, accelerator)
        trainer.json         the counters, the loaders' positions, the optimizers' and
                             schedulers' classes (plain JSON)

Format 2 (this one) names the files' hash algorithm in the manifest: XXH3-128 for new
checkpoints (see `trainloop.checkpoint.files` for why that is enough), BLAKE3 or SHA-256 in
earlier ones, which still load, as do format-1 (SHA-256) checkpoints. Under FSDP (`strategy="fsdp"`) the weights and the optimizers'
tensors are sharded instead: `__0_0.distcp`, `__1_0.distcp`, ... (each rank's shards) and
`.metadata`, written by torch.distributed.checkpoint, take the place of the safetensors files,
and `optimizer.pt` holds the optimizers' non-tensor state (hyperparameters, parameter names). A
sharded checkpoint loads at any world size (see `trainloop.checkpoint.distcp`). Which kind a run writes is
its strategy's choice (`state.strategy.sharded`).

Writing is all-or-nothing. Everything is written into `.<name>.partial/` next to the target,
each file and the directory fsynced, and only then renamed into place (`os.replace`); the
`latest` pointer file is replaced the same way. A process killed at any instant leaves either
the previous checkpoint or the new one, never a mix. (torch.distributed.checkpoint and
safetensors have no atomic write and no checksum of their own: both are ours to do.) Every
file follows the umask and is hashed as it is written, from the bytes written: nothing is read
back (except DCP's shards, which DCP writes itself). See `trainloop.checkpoint.files`.

`save(..., background=True)` stages the state (copies of the tensors, taken while the loop
waits) and writes it on a writer thread while training goes on; see `trainloop.checkpoint.staging`
for what that costs and how its failures reach every rank.

Reading never executes code. The manifest is JSON; every file load reads must be listed in it,
and is read once: its size and hash are checked against the manifest and it is deserialized
from those same bytes (hashed on other threads while this one deserializes; nothing is restored
before every hash matched). File names cannot leave the directory and a symbolic link in it is
refused; tensors come from safetensors or `torch.load(weights_only=True)`, and a file that would
need anything more is refused, naming what it asked for. Everything is read, checked and fitted
to the run (models, optimizers, schedulers, loaders) before anything is restored: a checkpoint
that is damaged (CheckpointError) or does not fit (ValueError) leaves the run as it was.

Under DDP, rank 0 writes everything: the replicas are identical, and the other ranks' RNG
states reach it through a gather. Under FSDP every rank writes its shards into the partial
directory first; rank 0 then writes the rest, hashes every file and renames (synchronously:
DCP's writes are collective). Every rank reads the checkpoint when loading, so on many machines
the directory must be on a filesystem they share.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainloop.checkpoint.files import (
    CheckpointError,
    in_parallel,
    read_verified,
    write_file,
    write_safetensors,
)
from trainloop.checkpoint.manifest import LATEST, _hash_algorithm, _read_manifest, _record
from trainloop.checkpoint.reading import _check_fit, _read_checkpoint, _restore
from trainloop.checkpoint.rng import _gather_rng_states
from trainloop.checkpoint.staging import writer_of
from trainloop.checkpoint.writing import _Snapshot, _without_duplicates, _write, _write_shards
from trainloop.collectives import broadcast
from trainloop.errors import CheckpointWarning
from trainloop.state import RunState

__all__ = ["CheckpointError", "CheckpointWarning", "checkpoints_in", "export", "finish_saves", "load",
           "save", "verify"]


def save(state: RunState, path: str | os.PathLike, background: bool = False, *,
         after_commit: Callable[[], None] | None = None) -> Path | Future:
    """Write a checkpoint of the run to the directory `path`, atomically. Call it on every rank.

    Returns the path. Raises CheckpointError on every rank if the write failed (disk full,
    permission denied); the previous checkpoints are untouched and the run may continue.

    `background=True`: returns a `concurrent.futures.Future` as soon as the state is staged
    (copied off the live tensors: the only time the loop waits); the files are written, hashed,
    fsynced and committed on a writer thread while training goes on, and `result()` is the path
    or raises CheckpointError. One save is in flight at a time: the next `save`, `load` and
    `finish` wait for it. A failure nobody retrieved from the Future is raised, on every rank, by
    the next `save` (as `PreviousSaveFailed`, before it saves anything) or by `finish`: those
    already synchronise the ranks, so the check costs no collective of its own. Under DDP only
    rank 0 writes; the other ranks' Futures are done at once, and they learn rank 0's outcome at
    that next save or `finish`. Under FSDP the save is synchronous (every rank writes its shards
    through DCP) and the returned Future is already done.

    `after_commit` (rank 0): called once the checkpoint is committed, on the thread that wrote
    it (the `Checkpoint` callback prunes there); its failure is the save's.
    """
    path = Path(path)
    rng = _gather_rng_states(state)  # also waits for, and settles, the save before this one
    if background and not state.strategy.sharded:
        return _save_in_background(state, path, rng, after_commit)
    error, sharded_optimizers = None, None
    if state.strategy.sharded:
        error, sharded_optimizers = _write_shards(state, path)
    if state.is_main and error is None:
        try:
            _write(_Snapshot(state, rng, sharded_optimizers), path)
            if after_commit is not None:
                after_commit()
        except Exception as failure:  # OSError, and safetensors' own error type for a full disk
            error = f"could not write checkpoint {path}: {failure}"
    error = broadcast(state, error)  # every rank learns the outcome: no one waits
    if error is not None:
        raise CheckpointError(error + " (the previous checkpoints are untouched)")
    return writer_of(state).done(path) if background else path


def _save_in_background(state: RunState, path: Path, rng: list[dict],
                        after_commit: Callable[[], None] | None) -> Future:
    writer = writer_of(state)
    writer.began_background_save()
    if not state.is_main:
        return writer.done(path)  # rank 0 writes; its outcome reaches this rank at the next save
    try:
        snapshot = _Snapshot(state, rng, None, writer.staging)
    except Exception as failure:  # out of memory for the staging copies
        raise CheckpointError(f"could not stage checkpoint {path}: {failure}") from None

    def write() -> Path:
        try:
            _write(snapshot, path)
            if after_commit is not None:
                after_commit()
        except Exception as failure:
            raise CheckpointError(f"could not write checkpoint {path} (in the background): {failure} "
                                  "(the previous checkpoints are untouched)") from None
        return path

    return writer.submit(write)


def finish_saves(state: RunState) -> None:
    """Wait for the background save in flight; raise its CheckpointError on every rank if it
    failed and no one retrieved the failure from its Future. `tl.finish` calls it; it is a
    collective only in a run that saved in the background."""
    writer = state.lineage.writer
    if writer is None or not writer.pending_report():
        return
    error = writer.wait()
    message = _first_error(state, None if error is None else str(error))
    writer.release()
    if message is not None:
        raise CheckpointError(message)


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """Check a checkpoint directory against its manifest; return the manifest.

    Raises CheckpointError naming the file and the reason: not a checkpoint, a format from a
    newer trainloop, a manifest that was altered or is not a well-formed one, a file missing,
    unlisted, truncated, changed, unreadable or a symbolic link, or a file name that would leave
    the directory.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    algorithm, names = _hash_algorithm(manifest), list(manifest["files"])
    in_parallel(lambda name: read_verified(path / name, _record(path, manifest, name), algorithm), names, names)
    return manifest


def load(state: RunState, path: str | os.PathLike) -> RunState:
    """Restore the run from the checkpoint at `path`; return the state with its counters.

    Restores in place the prepared models' weights, the optimizers, schedulers and loader
    positions, the callbacks' states and this rank's RNG states. Call it on every rank, after
    `prepare`. Raises CheckpointError (on every rank) for a damaged, foreign or unsafe
    checkpoint, and ValueError for one that does not fit the run (other parameter names or
    shapes, another optimizer or scheduler class, other param groups, another number of
    objects: the differences are listed). Either way nothing has been restored.
    """
    state.check_current("load")
    path = Path(path)
    if state.lineage.writer is not None:
        state.lineage.writer.wait_quietly()  # a save in flight may be writing this very checkpoint
    contents, error = None, None
    try:
        contents = _read_checkpoint(path)
    except CheckpointError as failure:
        error = str(failure)
    error = _first_error(state, error)  # a rank that cannot read it must not leave the others waiting
    if error is not None:
        raise CheckpointError(error)
    _check_fit(state, path, contents)
    return _restore(state, path, contents).advance("load")  # the state given becomes stale


def _first_error(state: RunState, error: str | None) -> str | None:
    """The first rank's error, on every rank (None when no rank had one)."""
    if state.world_size == 1:
        return error
    everyone: list[Any] = [None] * state.world_size
    dist.all_gather_object(everyone, error)  # plain strings, between this job's own ranks
    return next((e if rank == state.rank else f"rank {rank}: {e}"
                 for rank, e in enumerate(everyone) if e is not None), None)


def export(state: RunState, path: str | os.PathLike, model: torch.nn.Module | None = None) -> Path:
    """Write the trained model alone as one safetensors file (atomic), for inference and other tools.

    `model` defaults to the only prepared model. The file loads into a plain module with
    `safetensors.torch.load_model(module, path)`. Call it on every rank; rank 0 writes. Under
    FSDP the shards are gathered to rank 0's CPU one tensor at a time: rank 0 needs CPU memory
    for the whole model.
    """
    if model is None:
        if len(state.models) != 1:
            raise ValueError(f"export needs model= when the run prepared {len(state.models)} models")
        model = state.models[0]
    path = Path(path)
    state_dict = state.strategy.export_state_dict(model)  # sharded: every rank sends its shards to rank 0
    if state.is_main:
        temporary = path.parent / f".{path.name}.partial"
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()  # left by an export that was killed
        tensors, metadata = _without_duplicates(state_dict)
        write_file(temporary, lambda handle: write_safetensors(handle, tensors, metadata), None)
        os.replace(temporary, path)
    if state.world_size > 1:
        dist.barrier()
    return path


def checkpoints_in(directory: str | os.PathLike) -> Iterator[Path]:
    """The committed checkpoint directories under `directory`, newest (highest step) first.

    The one `latest` points to comes first; directories being written (`.partial`) are skipped.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    named = [p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")]
    named.sort(key=lambda p: p.name, reverse=True)
    first = _latest(directory)
    if first is not None:
        yield first
    yield from (p for p in named if p != first)


def _latest(directory: Path) -> Path | None:
    """The checkpoint the `latest` pointer names; None (one warning when it is damaged) if none."""
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_bytes().decode().strip()
    except (OSError, UnicodeDecodeError) as error:
        warnings.warn(f"ignoring {pointer}, which is damaged ({error}): the newest checkpoint by "
                      "name is tried first", CheckpointWarning, stacklevel=3)
        return None
    if name and Path(name).name == name and not name.startswith(".") and (directory / name).is_dir():
        return directory / name
    return None
