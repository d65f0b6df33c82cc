"""Writing a checkpoint: a snapshot of the run, written into a temporary directory, renamed into place.

Everything is written into a partial directory next to the target, each file and the directory
fsynced, and only then renamed into place (`os.replace`); the `latest` pointer file is replaced the
same way. A process killed at any instant leaves either the previous checkpoint or the new one,
never a mix.

Every temporary name is the save's own (`.<name>.<host>-<pid>-<n>.partial`): two jobs saving to
one path at once (which the `Checkpoint` callback's directory lock prevents, but `tl.save` alone
does not) each write, hash and rename their own files, so a committed checkpoint is one job's,
whole. Before writing, the free space of the target's filesystem is checked against the
snapshot's size, so a full disk is named as such instead of as torch's "unexpected pos".
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import shutil
import socket
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
from trainloop.checkpoint.manifest import EXTRA, LATEST, MANIFEST, _class_name, _manifest, _manifest_body, _model_file
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
                 staging: Staging | None = None, extra: dict[str, Any] | None = None,
                 keep_weight: Callable[[str, Any], bool] | None = None):
        stage = staging.tree if staging is not None else (lambda obj, key: obj)
        self.weights = None
        if sharded_optimizers is None:
            self.weights = []
            for index, model in enumerate(state.models):
                tensors, metadata = _weights(unwrap(model))
                if keep_weight is not None:  # save(filter={"model": ...})
                    tensors = {name: t for name, t in tensors.items() if keep_weight(name, t)}
                    metadata = {k: v for k, v in (metadata or {}).items() if v in tensors} or None
                self.weights.append((stage(tensors, ("model", index)), metadata))
        optimizers = sharded_optimizers
        if optimizers is None:
            optimizers = [stage(opt.state_dict(), ("optimizer", i)) for i, opt in enumerate(state.optimizers)]
        self.optimization = {"optimizers": optimizers,
                             "schedulers": [stage(sched.state_dict(), ("scheduler", i))
                                            for i, sched in enumerate(state.schedulers)]}
        self.callbacks = {cb.key: stage(cb.state_dict(), ("callback", cb.key)) for cb in state.callbacks}
        self.extra = {name: stage(value, ("extra", name)) for name, value in (extra or {}).items()}
        self.rng = rng
        self.trainer = stage(_trainer_record(state), ("trainer",))
        self.manifest = _manifest_body(state)
        if staging is not None:
            staging.wait()


def _write(snapshot: _Snapshot, path: Path, partial: Path | None = None) -> None:
    """Rank 0: write the checkpoint into a partial directory, hash it, rename it into place.

    For a sharded snapshot the ranks' shards are in `partial` already (`_write_shards`).
    """
    algorithm = default_hash()
    if partial is None:
        partial = _partial_dir(path)
        _make_fresh(partial)
    try:
        _check_space(path, snapshot)
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
        if snapshot.extra:
            contents[EXTRA] = _torch_saver(snapshot.extra)
        names = list(contents)
        files.update(in_parallel(lambda name: write_file(partial / name, contents[name], algorithm), names, names))
        manifest = _manifest(snapshot.manifest, dict(sorted(files.items())), algorithm)
        write_file(partial / MANIFEST, json.dumps(manifest, indent=1).encode(), algorithm)
        fsync(partial)
        _replace_dir(partial, path)
        _point_latest(path)
    except BaseException as failure:
        shutil.rmtree(partial, ignore_errors=True)
        full = _no_space(failure, path, snapshot) if isinstance(failure, Exception) else None
        if full is not None:  # torch.save's writer loses the errno ("unexpected pos ...")
            raise OSError(getattr(failure, "errno", None) or errno.ENOSPC, full) from None
        raise


_saves = itertools.count()


def _unique(path: Path, kind: str) -> Path:
    """A temporary name next to `path` that is this save's alone: host, pid and a counter."""
    return path.parent / f".{path.name}.{socket.gethostname()}-{os.getpid()}-{next(_saves)}.{kind}"


def _partial_dir(path: Path) -> Path:
    return _unique(path, "partial")


def _make_fresh(partial: Path) -> None:
    partial.mkdir(parents=True)  # a name of its own: nothing is there (remains are pruned by name)


def _snapshot_bytes(snapshot: _Snapshot) -> int:
    """About how many bytes the snapshot's files take (its tensors; the rest is small)."""
    total = 0

    def add(obj: Any) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for value in obj.values():
                add(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                add(value)

    add([tensors for tensors, _ in snapshot.weights or []])
    add(snapshot.optimization)
    add(snapshot.callbacks)
    add(snapshot.extra)
    return total + (64 << 10)  # the manifest, RNG states, counters and the files' headers


def _space_message(path: Path, needed: int, free: int | None) -> str:
    where = _mount_point(path.parent)
    left = "" if free is None else f", {free / 1e6:.1f} MB free"
    return f"no space left on {where} (needed ~{needed / 1e6:.1f} MB{left}) for checkpoint {path}"


def _check_space(path: Path, snapshot: _Snapshot) -> None:
    """OSError(ENOSPC) naming the filesystem if the snapshot cannot fit on it."""
    needed = _snapshot_bytes(snapshot)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return
    if free < needed:
        raise OSError(errno.ENOSPC, _space_message(path, needed, free))


def _no_space(failure: BaseException, path: Path, snapshot: _Snapshot) -> str | None:
    """The "no space left" message if `failure` was a full disk (or a file size limit), else None.

    torch.save reports a short write as "[enforce fail at inline_container.cc] unexpected pos":
    the errno is gone, so the free space (what is left once the partial files are removed) is
    asked again."""
    code = getattr(failure, "errno", None)
    if code == errno.EFBIG:
        return (f"a file of checkpoint {path} exceeds this process's file size limit (ulimit -f, "
                "RLIMIT_FSIZE): raise the limit")
    if code == errno.ENOSPC or (code is None and "unexpected pos" in str(failure)):
        needed = _snapshot_bytes(snapshot)
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = None
        if code == errno.ENOSPC or (free is not None and free < needed):
            return _space_message(path, needed, free)
        if code is None:  # not the space: the file size limit, the other cause of a short write
            return (f"a file of checkpoint {path} could not be written whole (a short write: a full "
                    "disk, a quota, or this process's file size limit, ulimit -f)")
    return None


def _mount_point(directory: Path) -> str:
    """The filesystem holding `directory`, as "<mount point> (<device>)"."""
    directory = directory.absolute()
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    device = os.stat(directory).st_dev
    mount = directory
    while mount != mount.parent and os.stat(mount.parent).st_dev == device:
        mount = mount.parent
    with contextlib.suppress(OSError), open("/proc/self/mounts", encoding="utf-8", errors="replace") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 1 and fields[1] == str(mount):
                return f"{mount} ({fields[0]})"
    return str(mount)


def _write_shards(state: RunState, path: Path) -> tuple[str | None, list[dict] | None, Path | None]:
    """Every rank: write its FSDP shards into the partial directory (DCP), which rank 0 makes.

    Returns `(error, optimizers' non-tensor state, the partial directory)`, the same on every rank. On many machines the
    directory must be on a filesystem they share: rank 0 then hashes every rank's files.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    from trainloop.checkpoint import distcp

    partial, error = None, None
    if state.is_main:
        try:
            partial = _partial_dir(path)  # rank 0's name for this save, which every rank writes into
            _make_fresh(partial)
        except OSError as failure:
            error = f"could not write checkpoint {path}: {failure}"
    error, partial = broadcast(state, (error, partial))  # no rank writes into a directory that is not there
    if error is not None:
        return error, None, None
    try:
        plain = distcp.save_sharded([unwrap(m) for m in state.models], state.optimizers, partial)
    except (Exception, CheckpointException) as failure:  # DCP raises the same on every rank
        if state.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        return f"could not write checkpoint {path}: {_reason(failure)}", None, None
    return None, plain, partial


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
        "accumulate": state.config.accumulate,  # what a resume compares its schedule with
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
        old = _unique(target, "old")
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    # The parent directory is fsynced once, by _point_latest, for both renames.


def _point_latest(path: Path) -> None:
    pointer = path.parent / LATEST
    temporary = _unique(pointer, "partial")
    write_file(temporary, (path.name + "\n").encode(), None)
    os.replace(temporary, pointer)
    fsync(path.parent)
