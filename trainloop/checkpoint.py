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
checkpoints (see `trainloop.checkpoint_files` for why that is enough), BLAKE3 or SHA-256 in
earlier ones, which still load, as do format-1 (SHA-256) checkpoints. Under FSDP (`strategy="fsdp"`) the weights and the optimizers'
tensors are sharded instead: `__0_0.distcp`, `__1_0.distcp`, ... (each rank's shards) and
`.metadata`, written by torch.distributed.checkpoint, take the place of the safetensors files,
and `optimizer.pt` holds the optimizers' non-tensor state (hyperparameters, parameter names). A
sharded checkpoint loads at any world size (see `trainloop.distcp`). Which kind a run writes is
its strategy's choice (`state.strategy.sharded`).

Writing is all-or-nothing. Everything is written into `.<name>.partial/` next to the target,
each file and the directory fsynced, and only then renamed into place (`os.replace`); the
`latest` pointer file is replaced the same way. A process killed at any instant leaves either
the previous checkpoint or the new one, never a mix. (torch.distributed.checkpoint and
safetensors have no atomic write and no checksum of their own: both are ours to do.) Every
file follows the umask and is hashed as it is written, from the bytes written: nothing is read
back (except DCP's shards, which DCP writes itself). See `trainloop.checkpoint_files`.

`save(..., background=True)` stages the state (copies of the tensors, taken while the loop
waits) and writes it on a writer thread while training goes on; see `trainloop.checkpoint_staging`
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
import hashlib
import json
import os
import random
import shutil
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainloop._version import __version__
from trainloop.checkpoint_files import (
    HASHES,
    CheckpointError,
    MemoryFile,
    check_hash,
    default_hash,
    file_record,
    fsync,
    map_listed,
    read_file,
    read_safetensors,
    read_verified,
    write_file,
    write_safetensors,
)
from trainloop.checkpoint_staging import WRITER, Staging
from trainloop.collectives import broadcast
from trainloop.errors import CheckpointWarning, PreviousSaveFailed
from trainloop.forwarding import unwrap
from trainloop.state import RunState

__all__ = ["CheckpointError", "CheckpointWarning", "checkpoints_in", "export", "finish_saves", "load",
           "save", "verify"]

FORMAT = "trainloop-checkpoint"
# 2: the manifest names its hash algorithm ("hash": "xxh3_128"), and each file's record keys its
# digest by it. 1: SHA-256 only, records {"size", "sha256"}; still read.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
LATEST = "latest"


# -- writing -----------------------------------------------------------------------------------


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
    return WRITER.done(path) if background else path


def _save_in_background(state: RunState, path: Path, rng: list[dict],
                        after_commit: Callable[[], None] | None) -> Future:
    WRITER.began_background_save()
    if not state.is_main:
        return WRITER.done(path)  # rank 0 writes; its outcome reaches this rank at the next save
    try:
        snapshot = _Snapshot(state, rng, None, WRITER.staging)
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

    return WRITER.submit(write)


def finish_saves(state: RunState) -> None:
    """Wait for the background save in flight; raise its CheckpointError on every rank if it
    failed and no one retrieved the failure from its Future. `tl.finish` calls it; it is a
    collective only in a run that saved in the background."""
    if not WRITER.pending_report():
        return
    error = WRITER.wait()
    message = _first_error(state, None if error is None else str(error))
    WRITER.release()
    if message is not None:
        raise CheckpointError(message)


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
            files.update(_in_parallel(_fsynced_record, [partial / name for name in shards], shards))
        contents["optimizer.pt"] = _torch_saver(snapshot.optimization)
        contents["callbacks.pt"] = _torch_saver(snapshot.callbacks)
        contents["rng.pt"] = _torch_saver(snapshot.rng)
        contents["trainer.json"] = json.dumps(snapshot.trainer, indent=1).encode()
        names = list(contents)
        files.update(_in_parallel(lambda name: write_file(partial / name, contents[name], algorithm), names, names))
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

    from trainloop import distcp

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


def _model_file(index: int) -> str:
    return "model.safetensors" if index == 0 else f"model-{index}.safetensors"


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


def _class_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _manifest_body(state: RunState) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "trainloop_version": __version__,
        "torch_version": torch.__version__,
        "step": state.step,
        "micro_step": state.micro_step,
        "epoch": state.loaders[0].state_dict()["epoch"] if state.loaders else None,
        "world_size": state.world_size,
        "strategy": state.config.strategy,
        "precision": state.config.precision,
        "models": len(state.models),
    }


def _manifest(body: dict[str, Any], files: dict[str, dict], algorithm: str) -> dict[str, Any]:
    body = {**body, "hash": algorithm, "files": files}
    return {**body, "manifest_sha256": _canonical_hash(body)}


def _canonical_hash(body: dict) -> str:
    """The manifest's hash of itself: SHA-256 in every format (a few kilobytes: speed is moot)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _file_record(file: Path) -> dict[str, Any]:
    """The record of an existing file, as a new checkpoint's manifest would hold it."""
    return file_record(file)


def _fsynced_record(file: Path) -> dict[str, Any]:
    fsync(file)
    return _file_record(file)


def _in_parallel(function, arguments: list, keys: list) -> dict:
    """{key: function(argument)}, computed on a few threads.

    Reading, hashing and fsync release the GIL, so the files of a checkpoint are read and hashed
    side by side.
    """
    if len(arguments) <= 1:
        return {key: function(argument) for key, argument in zip(keys, arguments)}
    with ThreadPoolExecutor(max_workers=min(len(arguments), os.cpu_count() or 1)) as pool:
        return dict(zip(keys, pool.map(function, arguments)))


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


# -- RNG states --------------------------------------------------------------------------------


def _rng_state(device: torch.device) -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    # Python's state as a tensor: 625 ints through the unpickler one by one would be the slowest
    # part of loading a small checkpoint.
    record: dict[str, Any] = {"python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
                              "torch": torch.get_rng_state()}
    with contextlib.suppress(ImportError):
        import numpy

        kind, keys, position, has_gauss, cached = numpy.random.get_state()
        record["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), position, has_gauss, cached]
    if device.type != "cpu":
        record["accelerator"] = torch.get_device_module(device).get_rng_state(device)
    return record


def _set_rng_state(record: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = record["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    torch.set_rng_state(record["torch"])
    if "numpy" in record:
        with contextlib.suppress(ImportError):
            import numpy

            kind, keys, position, has_gauss, cached = record["numpy"]
            numpy.random.set_state((kind, keys.numpy().astype("uint32"), position, has_gauss, cached))
    if "accelerator" in record and device.type != "cpu":
        torch.get_device_module(device).set_rng_state(record["accelerator"], device)


def _gather_rng_states(state: RunState) -> list[dict]:
    """Every rank's RNG states (for rank 0 to write), after waiting for this process's save in
    flight. Its outcome travels in the same gather: if any rank's previous background save
    failed unreported, every rank raises PreviousSaveFailed, and no one has saved anything."""
    previous = WRITER.wait()
    mine = (_rng_state(state.device), None if previous is None else str(previous))
    if state.world_size == 1:
        everyone = [mine]
    else:
        everyone = [None] * state.world_size
        dist.all_gather_object(everyone, mine)  # between this job's own ranks only
    failures = [error if state.world_size == 1 else f"rank {rank}: {error}"
                for rank, (_, error) in enumerate(everyone) if error is not None]
    if failures:
        raise PreviousSaveFailed(f"the previous background save failed: {'; '.join(failures)}")
    return [rng for rng, _ in everyone]


# -- reading -----------------------------------------------------------------------------------

# The files `load` reads besides the weights (`_model_file`) or DCP's shards.
_STATE_FILES = ("optimizer.pt", "callbacks.pt", "rng.pt", "trainer.json")


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
    _in_parallel(lambda name: read_verified(path / name, _record(path, manifest, name), algorithm), names, names)
    return manifest


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the checkpoint at `path`, checked for form; nothing else is read yet."""
    manifest_file = path / MANIFEST
    if not path.is_dir() or not (manifest_file.is_file() or manifest_file.is_symlink()):
        raise CheckpointError(f"{path} is not a trainloop checkpoint (no {MANIFEST})")
    _refuse_links(path)
    try:
        manifest = json.loads(read_file(manifest_file).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{manifest_file} is damaged: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_file} is not a trainloop checkpoint manifest")
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    if manifest.get("manifest_sha256") != _canonical_hash(body):
        raise CheckpointError(f"{manifest_file} was altered: its own hash does not match")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}, newer than this trainloop reads "
            f"({FORMAT_VERSION}): upgrade trainloop (it was written by {manifest.get('trainloop_version')})"
        )
    _check_manifest_form(manifest, manifest_file)
    for name in manifest["files"]:
        _inside(path, name)
    for name in _required_files(manifest):
        if name not in manifest["files"]:
            raise CheckpointError(f"{manifest_file} does not list {name}, which a checkpoint must hold")
    return manifest


def _check_manifest_form(manifest: dict[str, Any], manifest_file: Path) -> None:
    """CheckpointError unless the fields that loading uses have their types (a self-consistent
    manifest can still be a hand-made one)."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{manifest_file} is damaged: 'files' is not a mapping of file names to records")
    algorithm = _hash_algorithm(manifest, manifest_file)
    for name, record in files.items():
        if not (isinstance(record, dict) and _is_count(record.get("size"))
                and isinstance(record.get(algorithm), str)):
            raise CheckpointError(
                f"{manifest_file} is damaged: the record of {name!r} is not {{'size': bytes, "
                f"{algorithm!r}: hex}} (got {record!r:.80})")
    for key in ("models", "step", "micro_step"):
        if not _is_count(manifest.get(key)):
            raise CheckpointError(f"{manifest_file} is damaged: {key!r} is not a count (got {manifest.get(key)!r:.40})")
    if not isinstance(manifest.get("strategy"), str):
        raise CheckpointError(f"{manifest_file} is damaged: 'strategy' is not a name")


def _hash_algorithm(manifest: dict[str, Any], manifest_file: Path | None = None) -> str:
    """The algorithm the files' records use: SHA-256 in format 1, the named one in format 2."""
    if manifest["format_version"] < 2:
        return "sha256"
    algorithm = manifest.get("hash")
    if algorithm not in HASHES:
        raise CheckpointError(f"{manifest_file} names the hash {algorithm!r}, which this trainloop does not "
                              f"know ({', '.join(HASHES)}): upgrade trainloop")
    return algorithm


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _required_files(manifest: dict[str, Any]) -> list[str]:
    weights = [] if _sharded(manifest) else [_model_file(i) for i in range(manifest["models"])]
    return [*weights, *_STATE_FILES]


def _refuse_links(path: Path) -> None:
    """A checkpoint holds plain files: a symbolic link could make it load another file."""
    try:
        with os.scandir(path) as entries:
            links = sorted(entry.name for entry in entries if entry.is_symlink())
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error.strerror}") from None
    if links:
        raise CheckpointError(f"{path / links[0]} is a symbolic link: a checkpoint holds plain files only")


def _inside(directory: Path, name: str) -> Path:
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise CheckpointError(f"{directory / MANIFEST} names a file outside the checkpoint: {name!r}")
    return directory / name


def _record(path: Path, manifest: dict[str, Any], name: str) -> dict[str, Any]:
    """The manifest's record of `name`: only files the manifest lists are ever read."""
    record = manifest["files"].get(name)
    if record is None:
        raise CheckpointError(f"{path / name} is not listed in {path / MANIFEST}: only hashed files are read")
    return record


def safe_torch_load(file: Any, name: str | None = None) -> Any:
    """`torch.load(weights_only=True)` of a file, its bytes or a file object (`name` then says
    which file it was), with a clear refusal naming what an unsafe file wanted."""
    if not isinstance(file, (str, os.PathLike)):
        file = MemoryFile(file)
    try:
        if hasattr(file, "seek"):
            file.seek(0)
        return torch.load(file, weights_only=True, map_location="cpu")
    except Exception as error:
        try:
            if hasattr(file, "seek"):
                file.seek(0)
            wanted = torch.serialization.get_unsafe_globals_in_checkpoint(file)
        except Exception:
            wanted = []
        detail = f"it asks for {', '.join(wanted)}" if wanted else str(error).splitlines()[0]
        raise CheckpointError(
            f"refusing to load {name or file}: it is not plain tensors and data ({detail}); "
            "a checkpoint must never run code"
        ) from None


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
    WRITER.wait_quietly()  # a save in flight may be writing this very checkpoint
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


class _Contents:
    """A checkpoint read into memory and checked for form: what `_restore` restores from."""

    def __init__(self, manifest: dict, trainer: dict, optimization: dict, callbacks: dict,
                 rng: list, weights: list[dict[str, torch.Tensor]]):
        self.manifest, self.trainer, self.optimization = manifest, trainer, optimization
        self.callbacks, self.rng, self.weights = callbacks, rng, weights


def _read_checkpoint(path: Path) -> _Contents:
    """Read every file once and verify it. The files load needs are memory-mapped and hashed on
    other threads while this one deserializes them from the same mappings (weights_only, and
    safetensors' checked header: nothing in an unverified file can run code); nothing is
    returned, and so nothing restored, before every hash matched. DCP's shards are only hashed
    here: DCP reads them when restoring."""
    manifest = _read_manifest(path)
    algorithm = _hash_algorithm(manifest)
    kept = _required_files(manifest)
    data = {name: map_listed(path / name, _record(path, manifest, name)) for name in kept}
    others = [name for name in manifest["files"] if name not in data]
    with ThreadPoolExecutor(max_workers=min(len(manifest["files"]), os.cpu_count() or 1)) as pool:
        checks = [pool.submit(check_hash, path / name, data[name], manifest["files"][name], algorithm)
                  for name in sorted(data, key=lambda name: -len(data[name]))]
        checks += [pool.submit(read_verified, path / name, manifest["files"][name], algorithm) for name in others]
        try:
            contents, failure = _deserialize(path, manifest, data), None
        except CheckpointError as error:
            contents, failure = None, error
        for check in checks:
            check.result()  # a hash that does not match is the reason, whatever deserializing said
    if failure is not None:
        raise failure
    return contents


def _deserialize(path: Path, manifest: dict[str, Any], data: dict[str, Any]) -> _Contents:
    try:
        trainer = json.loads(bytes(data["trainer.json"]).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path / 'trainer.json'} is damaged: {error}") from None
    contents = _Contents(
        manifest, trainer,
        safe_torch_load(data["optimizer.pt"], path / "optimizer.pt"),
        safe_torch_load(data["callbacks.pt"], path / "callbacks.pt"),
        safe_torch_load(data["rng.pt"], path / "rng.pt"),
        [] if _sharded(manifest) else [read_safetensors(data[_model_file(i)], path / _model_file(i))
                                       for i in range(manifest["models"])],
    )
    _check_form(path, contents)
    return contents


def _check_form(path: Path, contents: _Contents) -> None:
    """CheckpointError unless the state files have the structure that `save` writes."""
    trainer, optimization = contents.trainer, contents.optimization

    def damaged(file: str, what: str) -> CheckpointError:
        return CheckpointError(f"{path / file} is damaged: {what}")

    if not (isinstance(trainer, dict)
            and all(_is_count(trainer.get(k)) for k in ("step", "micro_step", "logged_step"))
            and isinstance(trainer.get("loaders"), list)
            and all(isinstance(loader, dict) and _is_count(loader.get("epoch"))
                    and _is_count(loader.get("samples_seen")) for loader in trainer["loaders"])):
        raise damaged("trainer.json", "it is not the counters and loader positions that save writes")
    classes = trainer.get("classes", {})  # absent in format-1 checkpoints
    if not (isinstance(classes, dict)
            and all(isinstance(classes.get(k, []), list) for k in ("optimizers", "schedulers"))):
        raise damaged("trainer.json", "'classes' is not the optimizers' and schedulers' class names")
    if not (isinstance(optimization, dict) and isinstance(optimization.get("optimizers"), list)
            and isinstance(optimization.get("schedulers"), list)
            and all(isinstance(o, dict) and isinstance(o.get("state"), dict) and isinstance(o.get("param_groups"), list)
                    and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in o["param_groups"])
                    for o in optimization["optimizers"])
            and all(isinstance(s, dict) for s in optimization["schedulers"])):
        raise damaged("optimizer.pt", "it is not the optimizers' and schedulers' state dicts")
    if not isinstance(contents.callbacks, dict):
        raise damaged("callbacks.pt", "it is not the callbacks' state dicts by key")
    if not (isinstance(contents.rng, list)
            and all(isinstance(r, dict) and "python" in r and "torch" in r for r in contents.rng)):
        raise damaged("rng.pt", "it is not every rank's RNG states")


def _check_fit(state: RunState, path: Path, contents: _Contents) -> None:
    """ValueError listing what differs between the checkpoint and the run; changes nothing."""
    manifest, trainer, optimization = contents.manifest, contents.trainer, contents.optimization
    counts = {
        "models": (manifest["models"], len(state.models)),
        "optimizers": (len(optimization["optimizers"]), len(state.optimizers)),
        "schedulers": (len(optimization["schedulers"]), len(state.schedulers)),
        "loaders": (len(trainer["loaders"]), len(state.loaders)),
    }
    for kind, (saved, prepared) in counts.items():
        if saved != prepared:
            raise ValueError(f"{path} holds {saved} {kind} but the run prepared {prepared}: prepare the same objects")
    if _sharded(manifest):
        pass  # the shards' shapes are checked by distcp.load_sharded before it loads anything
    elif state.strategy.sharded:
        raise ValueError(
            f"{path} holds whole (unsharded) weights from a {manifest['strategy']!r} run; a "
            f"strategy={state.config.strategy!r} run loads sharded checkpoints only: resume with that "
            "strategy, or start from its weights with tl.export and load_state_dict before sharding"
        )
    else:
        for index, model in enumerate(state.models):
            _check_weights(unwrap(model), contents.weights[index], path / _model_file(index))
    classes = trainer.get("classes", {})
    problems = []
    for kind, objects, saved_states in (("optimizer", state.optimizers, optimization["optimizers"]),
                                        ("scheduler", state.schedulers, optimization["schedulers"])):
        saved_classes = classes.get(f"{kind}s", [])
        for index, obj in enumerate(objects):
            if index < len(saved_classes) and saved_classes[index] != _class_name(obj):
                problems.append(f"{kind} {index} is a {_class_name(obj)} in the run, a {saved_classes[index]} "
                                "in the checkpoint")
            elif kind == "optimizer":
                saved_sizes = [len(group["params"]) for group in saved_states[index]["param_groups"]]
                sizes = [len(group["params"]) for group in obj.param_groups]
                if saved_sizes != sizes:
                    problems.append(f"optimizer {index} ({type(obj).__name__}) has param groups of "
                                    f"{sizes} parameters in the run, {saved_sizes} in the checkpoint")
    if problems:
        raise ValueError(f"{path} does not fit the run: {'; '.join(problems)}. Prepare the same "
                         "optimizers and schedulers, built the same way, as the run that saved it")


def _check_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], file: Path) -> None:
    """ValueError listing the first differences of names and shapes (as `load_model` matches them:
    a tied weight is stored once)."""
    from safetensors.torch import _remove_duplicate_names

    expected = model.state_dict()
    for removed in _remove_duplicate_names(expected, preferred_names=list(tensors)).values():
        for name in removed:
            del expected[name]
    problems = [f"{name}: checkpoint {tuple(t.shape)}, model {tuple(expected[name].shape)}"
                for name, t in tensors.items() if name in expected and expected[name].shape != t.shape]
    problems += [f"{name}: in the checkpoint, not in the model" for name in tensors if name not in expected]
    problems += [f"{name}: in the model, not in the checkpoint" for name in expected if name not in tensors]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(f"{file} does not fit {type(model).__name__}: {shown}")


def _restore(state: RunState, path: Path, contents: _Contents) -> RunState:
    manifest, trainer, optimization = contents.manifest, contents.trainer, contents.optimization
    if _sharded(manifest):
        from trainloop import distcp

        distcp.load_sharded([unwrap(m) for m in state.models], state.optimizers, path,
                            manifest["files"], optimization["optimizers"])
    else:
        for model, tensors in zip(state.models, contents.weights):
            unwrap(model).load_state_dict(tensors, strict=False)  # _check_weights matched the names
        for optimizer, saved in zip(state.optimizers, optimization["optimizers"]):
            optimizer.load_state_dict(saved)
    for scheduler, saved in zip(state.schedulers, optimization["schedulers"]):
        scheduler.load_state_dict(saved)
    for loader, saved in zip(state.loaders, trainer["loaders"]):
        loader.load_state_dict(saved)
    for callback in state.callbacks:
        if callback.key in contents.callbacks:
            callback.load_state_dict(contents.callbacks[callback.key])
    if state.rank < len(contents.rng):
        _set_rng_state(contents.rng[state.rank], state.device)
    # The report due at the checkpoint's own step was made by the run that saved it (it logs
    # right after its on_step hooks): count it as made, so reports continue at the same steps.
    every = state.config.log_every
    logged_step = max(trainer["logged_step"], trainer["step"] // every * every)
    return state.evolve(step=trainer["step"], micro_step=trainer["micro_step"],
                        logged_step=logged_step, window_micro_steps=0, window_items=None,
                        pending_logs=None)


def _sharded(manifest: dict[str, Any]) -> bool:
    """Written by an FSDP run: torch.distributed.checkpoint's files, its `.metadata` among them."""
    return ".metadata" in manifest["files"]  # distcp.METADATA; importing distcp here would cost 0.5 s


# -- export ------------------------------------------------------------------------------------


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
