"""Checkpoint readers: the keys, shapes and tensors of safetensors files, torch files and state dicts."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from trainloop.models.hf import open_checkpoint

Checkpoint = str | os.PathLike | Mapping[str, torch.Tensor]


class _SafetensorsCheckpoint:
    """Safetensors files (one, or the shards of an index), memory-mapped a few tensors at a time.

    Resolved by `trainloop.models.hf.open_checkpoint`, as `tl.load_weights` resolves them: each
    key in the shard the index's `weight_map` names, every header checked before any data is read.
    """

    streams_from_disk = True  # its files can serve as the store of the "disk" modules

    def __init__(self, path: Path) -> None:
        with open_checkpoint(path) as checkpoint:  # headers only: no tensor data is read here
            self.file_of: dict[str, Path] = dict(checkpoint.file_of)
            self.shapes: dict[str, tuple[int, ...]] = {key: checkpoint.entry(key).shape for key in self.file_of}

    def read(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """`(key, tensor)` for each key: tensors are views into the file's memory map, not copies.

        Each file is opened once per call and closed when its keys are read: the pages a mapping
        touched count in this process's memory until it is closed and its views are dropped, so a
        handle kept open across a whole checkpoint would hold all of it.
        """
        keys = list(keys)
        for index, tensor in _read_safetensors([(self.file_of[key], key) for key in keys]):
            yield keys[index], tensor


class _MappingCheckpoint:
    """A state dict in memory, or a torch file loaded with mmap=True (its pages read on demand)."""

    streams_from_disk = False

    def __init__(self, tensors: Mapping[str, Any]) -> None:
        for key, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"checkpoint[{key!r}] is a {type(value).__name__}, not a tensor: "
                                "pass a flat state dict (name -> tensor)")
        self.tensors = tensors
        self.shapes = {key: tuple(value.shape) for key, value in tensors.items()}

    def read(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for key in keys:
            yield key, self.tensors[key]


def _read_safetensors(sources: Sequence[tuple[Path, str]]) -> Iterator[tuple[int, torch.Tensor]]:
    """`(i, tensor)` for the `(file, key)` at `sources[i]`, opening each file once."""
    by_file: dict[Path, list[int]] = {}
    for index, (file, _key) in enumerate(sources):
        by_file.setdefault(file, []).append(index)
    for file, indices in by_file.items():
        with safe_open(file, framework="pt") as handle:
            for index in indices:
                yield index, handle.get_tensor(sources[index][1])


def _open_checkpoint(checkpoint: Checkpoint) -> _SafetensorsCheckpoint | _MappingCheckpoint:
    """Read a checkpoint's index: which keys it has, their shapes and where each one is."""
    if isinstance(checkpoint, Mapping):
        return _MappingCheckpoint(checkpoint)
    path = Path(checkpoint)
    if path.is_file() and path.suffix in (".pt", ".pth", ".bin"):
        # weights_only: loading a checkpoint never runs code from it. mmap: tensors are paged in
        # when read, so the file is never in RAM as a whole.
        return _MappingCheckpoint(torch.load(path, map_location="cpu", mmap=True, weights_only=True))
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    # A .safetensors file, an index (.json) or a directory holding either: the resolver
    # load_weights shares (CheckpointError for a malformed index or a hostile file).
    return _SafetensorsCheckpoint(path)
