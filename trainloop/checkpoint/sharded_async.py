"""Background sharded saves: `tl.save(..., background=True)` under FSDP, HSDP and TP.

Every rank copies its shards to CPU (the only time the loop waits), then DCP's `async_save`
writes them into the save's partial directory on a thread of its own, over a gloo process group
that belongs to the run's background saves alone (`distcp.AsyncShards`, kept beside the run's
writer): its collectives never meet the training's. The run's writer thread waits for DCP's
save; rank 0's then writes the rest of the checkpoint (manifest, hashes, fsync) and commits it
as a synchronous save does (rename, then `latest`). A rank killed at any instant leaves the
previous checkpoint `latest` and nothing committed: the shards are in a hidden `.partial`
directory until rank 0 renames it whole.

What can fail is agreed on before any rank starts writing: a rank that could not stage (out of
memory) makes every rank raise CheckpointError at once, instead of leaving the others' DCP
threads waiting for it. What fails later (a full disk, a killed peer, the commit) is each
rank's Future's error, and, unretrieved, is raised on every rank at the next save or `finish`,
as for a local background save (`trainloop.checkpoint.staging`).

Imported only by sharded runs: it imports torch.distributed.checkpoint (through `distcp`).
"""

from __future__ import annotations

import copy
import shutil
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainloop.checkpoint import distcp
from trainloop.checkpoint.files import CheckpointError
from trainloop.checkpoint.staging import Writer, writer_of
from trainloop.checkpoint.writing import _make_fresh, _partial_dir, _reason, _Snapshot, _write
from trainloop.collectives import broadcast, gather_object
from trainloop.forwarding import unwrap

if TYPE_CHECKING:
    from trainloop.state import RunState

# Each run's AsyncShards, by its writer (`writer_of(state)`, on the run's Lineage): made at the
# run's first background sharded save, closed by `close` when the run's saves are finished.
_SHARDS: weakref.WeakKeyDictionary[Writer, distcp.AsyncShards] = weakref.WeakKeyDictionary()


def save_in_background(state: RunState, path: Path, rng: list[dict], after_commit: Callable[[], str | None],
                       extras: dict[str, Any]) -> Future:
    """Every rank: stage this rank's shards, start DCP's write, hand the commit to the writer thread.

    `rng` is every rank's RNG states (`_gather_rng_states`, which waited for the save before);
    `after_commit` runs on rank 0's writer thread once committed, returning its error message.
    Returns the rank's Future: rank 0's is the committed path, another rank's the path once its
    shards are written (rank 0's commit reaches it at the next save or `finish`).
    """
    writer = writer_of(state)
    writer.began_background_save()
    shards = _SHARDS.get(writer)
    if shards is None:
        shards = _SHARDS[writer] = distcp.AsyncShards(state.config.timeout)  # a collective: every rank is here
    error, partial = None, None
    if state.is_main:
        try:
            partial = _partial_dir(path)  # rank 0's name for this save, which every rank writes into
            _make_fresh(partial)
        except OSError as failure:
            error = f"could not write checkpoint {path}: {failure}"
    error, partial = broadcast(state, (error, partial))
    if error is not None or partial is None:
        raise CheckpointError(error or f"could not write checkpoint {path}: no partial directory")
    staged: dict[str, Any] = {}
    snapshot = None
    try:
        tensors, plain = distcp.sharded_state([unwrap(m) for m in state.models], state.optimizers)
        staged = shards.stage(tensors)
        if state.is_main:
            # The rest of the checkpoint, copied now too: training goes on before it is written.
            snapshot = _Snapshot(state, rng, copy.deepcopy(plain), writer.staging, extra=extras)
        error = None
    except Exception as failure:  # out of memory for the staging copies
        error = f"could not stage checkpoint {path}: {failure}"
    errors = [f"rank {rank}: {e}" for rank, e in enumerate(gather_object(state, error)) if e is not None]
    if errors:  # no rank has started writing: none is left waiting for another
        if state.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError("; ".join(errors) + " (the previous checkpoints are untouched)")
    written = shards.start(staged, partial)

    def write() -> Path:
        try:
            written.result()
        except BaseException as failure:  # DCP's CheckpointException is a BaseException
            if state.is_main:
                shutil.rmtree(partial, ignore_errors=True)
            raise CheckpointError(f"could not write checkpoint {path} (in the background): {_reason(failure)} "
                                  "(the previous checkpoints are untouched)") from None
        if snapshot is None:
            return path  # another rank's part is done; rank 0 commits
        try:
            _write(snapshot, path, partial)
        except Exception as failure:
            raise CheckpointError(f"could not write checkpoint {path} (in the background): {failure} "
                                  "(the previous checkpoints are untouched)") from None
        error = after_commit()
        if error is not None:
            raise CheckpointError(error + " (in the background)")
        return path

    return writer.submit(write)


def close(writer: Writer) -> None:
    """After `finish_saves` (every rank, its save done): the run's save group is left."""
    shards = _SHARDS.pop(writer, None)
    if shards is not None:
        shards.close()
