"""The checkpoint format: the manifest (what it records, how it is read and checked) and the files' names.

The manifest is JSON: the format version, the versions and counters of the run, the hash algorithm,
and the size and hash of every other file, with a hash of itself. It is read and checked for form
before any other file is opened; only the files it lists are ever read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainloop._version import __version__
from trainloop.checkpoint.files import (
    HASHES,
    CheckpointError,
    read_file,
)

if TYPE_CHECKING:
    from trainloop.state import RunState


FORMAT = "trainloop-checkpoint"


# 2: the manifest names its hash algorithm ("hash": "xxh3_128"), and each file's record keys its
# digest by it. 1: SHA-256 only, records {"size", "sha256"}; still read.
FORMAT_VERSION = 2


MANIFEST = "manifest.json"


LATEST = "latest"


# The files `load` reads besides the weights (`_model_file`) or DCP's shards.
_STATE_FILES = ("optimizer.pt", "callbacks.pt", "rng.pt", "trainer.json")


def _model_file(index: int) -> str:
    return "model.safetensors" if index == 0 else f"model-{index}.safetensors"


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


def _sharded(manifest: dict[str, Any]) -> bool:
    """Written by an FSDP run: torch.distributed.checkpoint's files, its `.metadata` among them."""
    return ".metadata" in manifest["files"]  # distcp.METADATA; importing distcp here would cost 0.5 s
