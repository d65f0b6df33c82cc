"""Reading a checkpoint: every file read once and verified, checked for form and for fit, then restored.

Nothing is restored before every hash matched and the checkpoint was found to fit the run: a
checkpoint that is damaged (CheckpointError) or does not fit (ValueError) leaves the run as it was.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from trainloop.checkpoint.files import (
    CheckpointError,
    MemoryFile,
    check_hash,
    map_listed,
    read_safetensors,
    read_verified,
)
from trainloop.checkpoint.manifest import (
    EXTRA,
    _hash_algorithm,
    _is_count,
    _model_file,
    _read_manifest,
    _record,
    _required_files,
    _sharded,
)


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


class _Contents:
    """A checkpoint read into memory and checked for form: what `_restore` restores from."""

    def __init__(self, manifest: dict, trainer: dict, optimization: dict, callbacks: dict,
                 rng: list, weights: list[dict[str, torch.Tensor]], extra: dict | None = None):
        self.manifest, self.trainer, self.optimization = manifest, trainer, optimization
        self.callbacks, self.rng, self.weights = callbacks, rng, weights
        self.extra = extra or {}  # `tl.save(..., extra=...)`: the user's own objects, by name


def _read_checkpoint(path: Path) -> _Contents:
    """Read every file once and verify it. The files load needs are memory-mapped and hashed on
    other threads while this one deserializes them from the same mappings (weights_only, and
    safetensors' checked header: nothing in an unverified file can run code); nothing is
    returned, and so nothing restored, before every hash matched. DCP's shards are only hashed
    here: DCP reads them when restoring."""
    manifest = _read_manifest(path)
    algorithm = _hash_algorithm(manifest)
    kept = _required_files(manifest) + ([EXTRA] if EXTRA in manifest["files"] else [])
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
    return contents  # pyright: ignore[reportReturnType]  (None only with a failure, raised above)


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
        safe_torch_load(data[EXTRA], path / EXTRA) if EXTRA in data else None,
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
    if not (isinstance(contents.extra, dict) and all(isinstance(k, str) for k in contents.extra)):
        raise damaged(EXTRA, "it is not the extra objects' states by name")
    if not (isinstance(contents.rng, list)
            and all(isinstance(r, dict) and "python" in r and "torch" in r for r in contents.rng)):
        raise damaged("rng.pt", "it is not every rank's RNG states")
