"""What trainloop knows of Hugging Face's conventions, in one place for training and inference.

- `declared_no_split`: the block classes a model names in `_no_split_modules` (its decoder
  layers): the units FSDP shards, activation checkpointing wraps and `device_map` keeps whole.
- `checkpoint_files`: which safetensors file holds each tensor of a checkpoint, from a single
  `model.safetensors` or a sharded checkpoint's `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

INDEX = "model.safetensors.index.json"  # Hugging Face's index of a sharded checkpoint
SINGLE = "model.safetensors"


def declared_no_split(model: nn.Module) -> list[str]:
    """The class names a model's modules declare in `_no_split_modules` (Hugging Face's convention)."""
    names: list[str] = []
    for module in model.modules():
        declared = getattr(module, "_no_split_modules", None) or ()
        if isinstance(declared, str):
            declared = [declared]
        names.extend(name for name in declared if isinstance(name, str) and name not in names)
    return names


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Each tensor name of the checkpoint at `path` -> the safetensors file that holds it."""
    if path.is_dir():
        index = path / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: path / file for name, file in weight_map.items()}
            absent = sorted({str(f) for f in files.values() if not f.is_file()})
            if absent:
                raise FileNotFoundError(f"{index} names file(s) that do not exist: {', '.join(absent)}")
            return files
        if (path / SINGLE).is_file():
            path = path / SINGLE
        else:
            raise FileNotFoundError(f"{path} holds neither {INDEX} nor {SINGLE}: not a safetensors checkpoint")
    if not path.is_file():
        raise FileNotFoundError(f"no safetensors checkpoint at {path}")
    from safetensors import safe_open

    with safe_open(path, framework="pt") as reader:
        return dict.fromkeys(reader.keys(), path)
