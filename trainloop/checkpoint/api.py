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

Writing is all-or-nothing. Everything is written into a temporary directory of the save's own
(`.<name>.<host>-<pid>-<n>.partial/`) next to the target,
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
directory first; rank 0 then writes the rest, hashes every file and renames. In the background
the shards are staged and written by DCP's `async_save` on a process group of its own
(`trainloop.checkpoint.sharded_async`). Every rank reads the checkpoint when loading, so on many
machines the directory must be on a filesystem they share.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainloop.checkpoint.export import export as _export
from trainloop.checkpoint.files import (
    CheckpointError,
    in_parallel,
    read_verified,
)
from trainloop.checkpoint.fitting import PARTS, plan, restore
from trainloop.checkpoint.manifest import LATEST, _hash_algorithm, _read_manifest, _record
from trainloop.checkpoint.reading import _read_checkpoint
from trainloop.checkpoint.rng import _gather_rng_states
from trainloop.checkpoint.safe_state import check_callback_states, extra_states
from trainloop.checkpoint.staging import writer_of
from trainloop.checkpoint.writing import _Snapshot, _write, _write_shards
from trainloop.collectives import broadcast
from trainloop.errors import CheckpointWarning
from trainloop.models.hf_export import ExportKeyMap
from trainloop.state import RunState

__all__ = ["CheckpointError", "CheckpointWarning", "checkpoints_in", "export", "finish_saves", "load",
           "save", "verify"]


def save(state: RunState, path: str | os.PathLike, background: bool = False, *,
         extra: Mapping[str, Any] | None = None, filter: Mapping[str, Callable[[str, Any], bool]] | None = None,
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
    that next save or `finish`. Under a sharded strategy (FSDP, HSDP, TP) every rank copies its
    shards to CPU and DCP writes them in the background (`async_save`, on a gloo process group
    of the run's saves alone); rank 0's Future is the commit, another rank's is done once its
    shards are written, and it learns rank 0's outcome at that next save or `finish`.

    `extra`: the user's own objects, by name, saved beside the run (`extra.pt`) and restored by
    `tl.load(..., extra=...)`: an object with `state_dict()` (an EMA model, a metric, a data
    module) is saved as its state dict, anything else as the plain data it is (a config dict,
    a best score). Rank 0's objects are saved, whole. `filter`: by name ("model" for the
    prepared models' weights, or an `extra` name), a function `(key, value) -> bool` that keeps
    the entries of that state dict it returns True for (e.g. only the adapter weights); a
    checkpoint of filtered weights loads with `tl.load(..., strict=False)`. As Fabric's
    `save(path, state, filter=)`.

    `after_commit` (rank 0): called once the checkpoint is committed, on the thread that wrote
    it (the `Checkpoint` callback prunes there). Its failure is raised as the save's
    CheckpointError, which then says that the checkpoint was committed.

    What every callback's `state_dict()` holds must load with `torch.load(weights_only=True)`:
    tensors, numbers, strings, bytes, None, and dicts, lists, tuples and sets of them. Anything
    else (a NumPy scalar or array, an object) is refused before anything is written, with a
    CheckpointError naming the callback and the key: a checkpoint that no resume can load would
    be worse than none.
    """
    path = Path(path)
    check_callback_states(state)
    extras = extra_states(extra, filter)
    keep_weight = (filter or {}).get("model")
    if keep_weight is not None and state.strategy.sharded:
        raise ValueError("save filter={'model': ...} needs whole weights: a sharded (FSDP) checkpoint holds every shard")
    rng = _gather_rng_states(state)  # also waits for, and settles, the save before this one
    if background and state.strategy.sharded:
        from trainloop.checkpoint import sharded_async  # DCP: sharded runs only

        return sharded_async.save_in_background(state, path, rng, lambda: _after(after_commit, path), extras)
    if background:
        return _save_in_background(state, path, rng, after_commit, extras, keep_weight)
    error, sharded_optimizers, partial = None, None, None
    if state.strategy.sharded:
        error, sharded_optimizers, partial = _write_shards(state, path)
        if error is not None:
            error += " (the previous checkpoints are untouched)"
    if state.is_main and error is None:
        try:
            _write(_Snapshot(state, rng, sharded_optimizers, extra=extras, keep_weight=keep_weight), path, partial)
        except Exception as failure:  # OSError, and safetensors' own error type for a full disk
            error = f"could not write checkpoint {path}: {failure} (the previous checkpoints are untouched)"
        else:
            error = _after(after_commit, path)
    error = broadcast(state, error)  # every rank learns the outcome: no one waits
    if error is not None:
        raise CheckpointError(error)
    return path


def _after(after_commit: Callable[[], None] | None, path: Path) -> str | None:
    """Run `after_commit`; the error message if it failed (the checkpoint stands)."""
    if after_commit is None:
        return None
    try:
        after_commit()
    except Exception as failure:
        return (f"checkpoint {path} was committed (it is whole and loads), but what was to follow "
                f"its commit failed: {type(failure).__name__}: {failure}")
    return None


def _save_in_background(state: RunState, path: Path, rng: list[dict], after_commit: Callable[[], None] | None,
                        extras: dict[str, Any], keep_weight: Callable | None) -> Future:
    writer = writer_of(state)
    writer.began_background_save()
    if not state.is_main:
        return writer.done(path)  # rank 0 writes; its outcome reaches this rank at the next save
    try:
        snapshot = _Snapshot(state, rng, None, writer.staging, extra=extras, keep_weight=keep_weight)
    except Exception as failure:  # out of memory for the staging copies
        raise CheckpointError(f"could not stage checkpoint {path}: {failure}") from None

    def write() -> Path:
        try:
            _write(snapshot, path)
        except Exception as failure:
            raise CheckpointError(f"could not write checkpoint {path} (in the background): {failure} "
                                  "(the previous checkpoints are untouched)") from None
        error = _after(after_commit, path)
        if error is not None:
            raise CheckpointError(error + " (in the background)")
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
    if state.strategy.sharded:
        from trainloop.checkpoint import sharded_async

        sharded_async.close(writer)  # every rank: the save group of the run's background saves
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


def load(state: RunState, path: str | os.PathLike, *, strict: bool = True,
         only: Iterable[str] | None = None, extra: MutableMapping[str, Any] | None = None) -> Any:
    """Restore the run from the checkpoint at `path`; return the state with its counters.

    Restores in place the prepared models' weights, the optimizers, schedulers and loader
    positions, the callbacks' states and this rank's RNG states. Call it on every rank, after
    `prepare`. Raises CheckpointError (on every rank) for a damaged, foreign or unsafe
    checkpoint, and ValueError for one that does not fit the run (other parameter names or
    shapes, another optimizer or scheduler class, other param groups, another number of
    objects: the differences are listed). Either way nothing has been restored.

    Args:
        strict: False restores what fits and leaves the rest as it is: a model's weights where
            names and shapes match, the optimizers, schedulers and loaders that pair up, the
            extra objects the checkpoint holds. Then `(state, not_restored)` is returned,
            `not_restored` a list naming, in words, each thing left as it was (and each extra
            object the checkpoint holds that was not asked for).
        only: restore these parts alone, of "models", "optimizers", "schedulers", "loaders",
            "callbacks", "rng" and "counters" (`state.step` and the other counters): e.g.
            `only=("models",)` for the weights of a run, to fine-tune them with a new optimizer.
            The counters stay as they are unless "counters" is named. None: everything.
        extra: the user's own objects saved with `tl.save(..., extra=...)`, by name: an object
            with `load_state_dict` (a module, an EMA, a metric) is restored in place; plain data
            is put back into this mapping. Strict, every name must be in the checkpoint.

    Example:
        ema = EMA(model)
        state = tl.load(state, "ckpt/step-00000500", extra={"ema": ema})
        state, skipped = tl.load(state, "pretrained/", only=("models",), strict=False)
    """
    state.check_current("load")
    path = Path(path)
    parts = frozenset(PARTS if only is None else ((only,) if isinstance(only, str) else only))
    unknown = sorted(parts - set(PARTS))
    if unknown:
        raise ValueError(f"load only= takes {', '.join(PARTS)} (got {unknown[0]!r})")
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
    if _is_sharded(contents) and (not strict or not {"models", "optimizers"} <= parts):
        raise ValueError(f"{path} is a sharded (FSDP) checkpoint: it loads whole (models and optimizers "
                         "together, strict); for a part of it, tl.export the model and load that")
    not_restored: list[str] | None = None if strict else []
    fitted = plan(state, path, contents, parts, not_restored, extra)
    state = restore(state, path, contents, fitted, extra).advance("load")  # the state given becomes stale
    return state if strict else (state, not_restored)


def _is_sharded(contents: Any) -> bool:
    return ".metadata" in contents.manifest["files"]


def _first_error(state: RunState, error: str | None) -> str | None:
    """The first rank's error, on every rank (None when no rank had one)."""
    if state.world_size == 1:
        return error
    everyone: list[Any] = [None] * state.world_size
    dist.all_gather_object(everyone, error)  # plain strings, between this job's own ranks
    return next((e if rank == state.rank else f"rank {rank}: {e}"
                 for rank, e in enumerate(everyone) if e is not None), None)


def export(state: RunState, path: str | os.PathLike, model: torch.nn.Module | None = None, *,
           dtype: torch.dtype | None = None, hf_index: bool = False, max_shard_size: int | str = "5GB",
           key_map: ExportKeyMap | None = None,
           transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> Path:
    """Write the trained model alone as safetensors (atomic), for inference and other tools.

    Call it on every rank; rank 0 writes. Under FSDP, HSDP or TP the shards are gathered one
    tensor at a time and written as they come: no rank holds more than one whole tensor beyond
    its shards (`trainloop.checkpoint.export`).

    Args:
        path: the file (default), or with `hf_index=True` the directory to write.
        model: the model to export; defaults to the only prepared model.
        dtype: a floating dtype (`torch.bfloat16`) the floating tensors are cast to; None keeps theirs.
        hf_index: write a Hugging Face directory: `model-0000k-of-0000n.safetensors` files,
            `model.safetensors.index.json` and the model's `config.json` (when it has an HF
            config), which `from_pretrained(path)` loads as it is.
        max_shard_size: the largest file of an `hf_index` export, in bytes or as "5GB" / "500MiB".
        key_map: the run's names -> the file's: a callable (None leaves a tensor out) or a dict
            like torchtitan's `to_hf_map` (`{"layers.{}.attention.wq.weight":
            "model.layers.{}.self_attn.q_proj.weight"}`); a name the dict lacks raises ValueError.
        transform: `(file's name, whole tensor) -> tensor` of the same shape and dtype, run on
            rank 0 before each tensor is written: a layout change that renaming cannot express
            (torchtitan's Llama adapter permutes wq and wk for Hugging Face's rotary embedding).

    A tied weight is written once (Hugging Face's way: `lm_head.weight` is left out when it is
    the embedding). One file loads with `safetensors.torch.load_model(module, path)` or
    `tl.load_weights`. Raises ValueError for a bad argument, CheckpointError (on every rank) when
    rank 0 cannot write, leaving what was at `path` before.

    Example:
        tl.export(state, "out/hf", dtype=torch.bfloat16, hf_index=True, max_shard_size="2GB")
        model = transformers.AutoModelForCausalLM.from_pretrained("out/hf")
    """
    return _export(state, path, model, dtype=dtype, hf_index=hf_index, max_shard_size=max_shard_size,
                   key_map=key_map, transform=transform)


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
