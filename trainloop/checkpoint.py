"""Checkpoints that never lose work: `save`, `load`, `export`.

A checkpoint is a directory:

    step-00000500/
        manifest.json        format version, versions, counters, settings, and the size and
                             SHA-256 of every other file (and a hash of itself)
        model.safetensors    the weights (model-1.safetensors, ... for further models)
        optimizer.pt         the optimizers' and schedulers' state dicts } torch.save; loaded
        callbacks.pt         each callback's state_dict, by its key      } with weights_only=True
        rng.pt               every rank's RNG states (Python, NumPy, torch CPU, accelerator)
        trainer.json         the counters and the loaders' positions (plain JSON)

Under FSDP (`strategy="fsdp"`) the weights and the optimizers' tensors are sharded instead:
`__0_0.distcp`, `__1_0.distcp`, ... (each rank's shards) and `.metadata`, written by
torch.distributed.checkpoint, take the place of the safetensors files, and `optimizer.pt` holds
the optimizers' non-tensor state (hyperparameters, parameter names). A sharded checkpoint loads
at any world size (see `trainloop.fsdp`).

Writing is all-or-nothing. Everything is written into `.<name>.partial/` next to the target,
each file and the directory fsynced, and only then renamed into place (`os.replace`); the
`latest` pointer file is replaced the same way. A process killed at any instant leaves either
the previous checkpoint or the new one, never a mix. (torch.distributed.checkpoint and
safetensors have no atomic write and no checksum of their own: both are ours to do.)

Reading never executes code. The manifest is JSON; every file's size and SHA-256 are checked
against it before anything else is read; file names in it cannot leave the directory; tensors
come from safetensors or `torch.load(weights_only=True)`, and a file that would need anything
more is refused, naming what it asked for.

Under DDP, rank 0 writes everything: the replicas are identical, and the other ranks' RNG
states reach it through a gather. Under FSDP every rank writes its shards into the partial
directory first; rank 0 then writes the rest, hashes every file and renames. Every rank reads
the checkpoint when loading, so on many machines the directory must be on a filesystem they
share.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainloop._version import __version__
from trainloop.collectives import broadcast
from trainloop.prepare import unwrap
from trainloop.state import RunState

FORMAT = "trainloop-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"


class CheckpointError(Exception):
    """A checkpoint could not be written, or is not one that may be loaded (the reason says why)."""


# -- writing -----------------------------------------------------------------------------------


def save(state: RunState, path: str | os.PathLike) -> Path:
    """Write a checkpoint of the run to the directory `path`, atomically. Call it on every rank.

    Returns the path. Raises CheckpointError on every rank if the write failed (disk full,
    permission denied); the previous checkpoints are untouched and the run may continue.
    """
    path = Path(path)
    rng = _gather_rng_states(state)
    error, sharded_optimizers = None, None
    if state.config.strategy == "fsdp":
        error, sharded_optimizers = _write_shards(state, path)
    if state.is_main and error is None:
        try:
            _write(state, path, rng, sharded_optimizers)
        except Exception as failure:  # OSError, and safetensors' own error type for a full disk
            error = f"could not write checkpoint {path}: {failure}"
    error = broadcast(state, error)  # every rank learns the outcome: no one waits
    if error is not None:
        raise CheckpointError(error + " (the previous checkpoints are untouched)")
    return path


def _write(state: RunState, path: Path, rng: list[dict], sharded_optimizers: list[dict] | None) -> None:
    """Rank 0: write the checkpoint into the partial directory, hash it, rename it into place.

    `sharded_optimizers`: under FSDP, the ranks' shards are in the partial directory already and
    this is the optimizers' non-tensor state (`_write_shards`); otherwise None.
    """
    partial = _partial_dir(path)
    if sharded_optimizers is None:
        _make_fresh(partial)
    try:
        from safetensors.torch import save_model

        if sharded_optimizers is None:
            for index, model in enumerate(state.models):
                save_model(unwrap(model), str(partial / _model_file(index)))
        optimizers = sharded_optimizers
        if optimizers is None:
            optimizers = [opt.state_dict() for opt in state.optimizers]
        _torch_save({"optimizers": optimizers,
                     "schedulers": [sched.state_dict() for sched in state.schedulers]},
                    partial / "optimizer.pt")
        _torch_save({cb.key: cb.state_dict() for cb in state.callbacks}, partial / "callbacks.pt")
        _torch_save(rng, partial / "rng.pt")
        (partial / "trainer.json").write_text(json.dumps(_trainer_record(state), indent=1))
        files = sorted(p.name for p in partial.iterdir())
        manifest = _manifest(state, _in_parallel(_fsynced_record, [partial / name for name in files], files))
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync(partial / MANIFEST)
        _fsync(partial)
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

    from trainloop import fsdp

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
        plain = fsdp.save_sharded([unwrap(m) for m in state.models], state.optimizers, partial)
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


def _torch_save(obj: Any, file: Path) -> None:
    with open(file, "wb") as handle:
        torch.save(obj, handle)


def _trainer_record(state: RunState) -> dict[str, Any]:
    return {
        "step": state.step,
        "micro_step": state.micro_step,
        "logged_step": state.logged_step,
        "loaders": [loader.state_dict() for loader in state.loaders],
    }


def _manifest(state: RunState, files: dict[str, dict]) -> dict[str, Any]:
    body = {
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
        "files": files,
    }
    return {**body, "manifest_sha256": _canonical_hash(body)}


def _canonical_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _file_record(file: Path) -> dict[str, Any]:
    return {"size": file.stat().st_size, "sha256": _sha256(file)}


def _fsynced_record(file: Path) -> dict[str, Any]:
    _fsync(file)
    return _file_record(file)


def _in_parallel(function, arguments: list, keys: list) -> dict:
    """{key: function(argument)}, computed on a few threads.

    Hashing and fsync release the GIL, so the files of a checkpoint are hashed side by side:
    SHA-256 over the bytes, not the writing, is what costs most on a fast disk.
    """
    if len(arguments) <= 1:
        return {key: function(argument) for key, argument in zip(keys, arguments)}
    with ThreadPoolExecutor(max_workers=min(len(arguments), os.cpu_count() or 1)) as pool:
        return dict(zip(keys, pool.map(function, arguments)))


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    temporary.write_text(path.name + "\n")
    _fsync(temporary)
    os.replace(temporary, pointer)
    _fsync(path.parent)


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
    mine = _rng_state(state.device)
    if state.world_size == 1:
        return [mine]
    everyone: list[Any] = [None] * state.world_size
    dist.all_gather_object(everyone, mine)  # between this job's own ranks only
    return everyone


# -- reading -----------------------------------------------------------------------------------


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """Check a checkpoint directory against its manifest; return the manifest.

    Raises CheckpointError naming the file and the reason: not a checkpoint, a format from a
    newer trainloop, a manifest that was altered, a file missing, truncated or changed, or a
    file name that would leave the directory.
    """
    path = Path(path)
    manifest_file = path / MANIFEST
    if not path.is_dir() or not manifest_file.is_file():
        raise CheckpointError(f"{path} is not a trainloop checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_file.read_text())
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
    files = [_inside(path, name) for name in manifest["files"]]
    for file, record in zip(files, manifest["files"].values()):
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        size = file.stat().st_size
        if size != record["size"]:
            raise CheckpointError(f"{file} is {size} bytes, the manifest says {record['size']} (truncated?)")
    hashes = _in_parallel(_sha256, files, files)
    for file, record in zip(files, manifest["files"].values()):
        if hashes[file] != record["sha256"]:
            raise CheckpointError(f"{file} does not match its SHA-256 in the manifest (changed or corrupted)")
    return manifest


def _inside(directory: Path, name: str) -> Path:
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise CheckpointError(f"{directory / MANIFEST} names a file outside the checkpoint: {name!r}")
    return directory / name


def safe_torch_load(file: Path) -> Any:
    """`torch.load(weights_only=True)`, with a clear refusal naming what an unsafe file wanted."""
    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except Exception as error:
        try:
            wanted = torch.serialization.get_unsafe_globals_in_checkpoint(file)
        except Exception:
            wanted = []
        detail = f"it asks for {', '.join(wanted)}" if wanted else str(error).splitlines()[0]
        raise CheckpointError(
            f"refusing to load {file}: it is not plain tensors and data ({detail}); "
            "a checkpoint must never run code"
        ) from None


def load(state: RunState, path: str | os.PathLike) -> RunState:
    """Restore the run from the checkpoint at `path`; return the state with its counters.

    Restores in place the prepared models' weights, the optimizers, schedulers and loader
    positions, the callbacks' states and this rank's RNG states. Call it on every rank, after
    `prepare`. Raises CheckpointError for a damaged, foreign or unsafe checkpoint, and
    ValueError for one that does not fit the run (other parameter names or shapes: the first
    mismatches are listed).
    """
    state.check_current("load")
    path = Path(path)
    return _restore(state, path, verify(path)).advance("load")  # the state given becomes stale


def _restore(state: RunState, path: Path, manifest: dict[str, Any]) -> RunState:
    trainer = json.loads((path / "trainer.json").read_text())
    optimization = safe_torch_load(path / "optimizer.pt")
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
        from trainloop import fsdp

        fsdp.load_sharded([unwrap(m) for m in state.models], state.optimizers, path,
                          manifest["files"], optimization["optimizers"])
    elif state.config.strategy == "fsdp":
        raise ValueError(
            f"{path} holds whole (unsharded) weights from a {manifest['strategy']!r} run; a "
            "strategy='fsdp' run loads sharded checkpoints only: resume with that strategy, "
            "or start from its weights with tl.export and load_state_dict before sharding"
        )
    else:
        for index, model in enumerate(state.models):
            _load_weights(unwrap(model), path / _model_file(index))
        for optimizer, saved in zip(state.optimizers, optimization["optimizers"]):
            optimizer.load_state_dict(saved)
    for scheduler, saved in zip(state.schedulers, optimization["schedulers"]):
        scheduler.load_state_dict(saved)
    for loader, saved in zip(state.loaders, trainer["loaders"]):
        loader.load_state_dict(saved)
    saved_callbacks = safe_torch_load(path / "callbacks.pt")
    for callback in state.callbacks:
        if callback.key in saved_callbacks:
            callback.load_state_dict(saved_callbacks[callback.key])
    rng = safe_torch_load(path / "rng.pt")
    if state.rank < len(rng):
        _set_rng_state(rng[state.rank], state.device)
    # The report due at the checkpoint's own step was made by the run that saved it (it logs
    # right after its on_step hooks): count it as made, so reports continue at the same steps.
    every = state.config.log_every
    logged_step = max(trainer["logged_step"], trainer["step"] // every * every)
    return state.evolve(step=trainer["step"], micro_step=trainer["micro_step"],
                        logged_step=logged_step, window_micro_steps=0, window_items=None,
                        pending_logs=None)


def _sharded(manifest: dict[str, Any]) -> bool:
    """Written by an FSDP run: torch.distributed.checkpoint's files, its `.metadata` among them."""
    return ".metadata" in manifest["files"]  # fsdp.METADATA; importing fsdp here would cost 0.6 s


def _load_weights(model: torch.nn.Module, file: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_model

    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    with safe_open(str(file), framework="pt") as reader:
        found = {name: tuple(reader.get_slice(name).get_shape()) for name in reader.keys()}  # noqa: SIM118 (safe_open is not iterable)
    problems = [f"{name}: checkpoint {shape}, model {expected[name]}"
                for name, shape in found.items() if name in expected and expected[name] != shape]
    problems += [f"{name}: in the checkpoint, not in the model" for name in found if name not in expected]
    missing, _ = load_model(model, str(file), strict=False) if not problems else ([], [])
    problems += [f"{name}: in the model, not in the checkpoint" for name in missing]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(f"{file} does not fit {type(model).__name__}: {shown}")


# -- export ------------------------------------------------------------------------------------


def export(state: RunState, path: str | os.PathLike, model: torch.nn.Module | None = None) -> Path:
    """Write the trained model alone as one safetensors file (atomic), for inference and other tools.

    `model` defaults to the only prepared model. The file loads into a plain module with
    `safetensors.torch.load_model(module, path)`. Call it on every rank; rank 0 writes. Under
    FSDP the shards are gathered to rank 0's CPU one tensor at a time: rank 0 needs CPU memory
    for the whole model.
    """
    from safetensors.torch import save_file, save_model

    if model is None:
        if len(state.models) != 1:
            raise ValueError(f"export needs model= when the run prepared {len(state.models)} models")
        model = state.models[0]
    path = Path(path)
    gathered = None
    if state.config.strategy == "fsdp":
        from trainloop import fsdp

        gathered = fsdp.full_state_dict(unwrap(model))  # every rank sends its shards to rank 0
    if state.is_main:
        temporary = path.parent / f".{path.name}.partial"
        path.parent.mkdir(parents=True, exist_ok=True)
        if gathered is None:
            save_model(unwrap(model), str(temporary))
        else:
            save_file(gathered, str(temporary), metadata={"format": "pt"})
        _fsync(temporary)
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
    pointer = directory / LATEST
    first = None
    if pointer.is_file():
        name = pointer.read_text().strip()
        if name and Path(name).name == name and (directory / name).is_dir():
            first = directory / name
            yield first
    yield from (p for p in named if p != first)
