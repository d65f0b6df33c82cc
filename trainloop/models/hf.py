"""What trainloop knows of Hugging Face's conventions, in one place for training and inference.

- `declared_no_split`: the block classes a model names in `_no_split_modules` (its decoder
  layers): the units FSDP shards, activation checkpointing wraps and `device_map` keeps whole.
- `open_checkpoint`: the one resolver of a safetensors checkpoint (a file, a directory with a
  `model.safetensors` or a sharded checkpoint's `model.safetensors.index.json`, or an index file)
  for `tl.load_weights` and `trainloop.bigmodel` alike: which file holds each tensor, every
  file opened once and its header checked (`trainloop.models.safetensors_file`).

An index may name only files inside its own directory: no absolute path, no `..`, no symlink
that resolves outside it. One exception keeps Hugging Face's hub cache loading: when the index
itself is a symlink (`snapshots/<rev>/model.safetensors.index.json -> ../../blobs/<hash>`), a
shard may also resolve beside the index's target (the repository's `blobs/`). Each tensor is
where the index's `weight_map` puts it, and in no other shard: a tensor that two shards hold
(a stale copy left behind) is refused, naming both, rather than loaded from either.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePath

from torch import nn

from trainloop.errors import CheckpointError
from trainloop.models.safetensors_file import Entry, SafetensorsFile, is_torch_file, torch_file_message

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


class SafetensorsCheckpoint:
    """A safetensors checkpoint opened for reading: each tensor's file and entry, every file held open.

    `file_of[name]` is the file holding tensor `name`, `files[path]` its open `SafetensorsFile`.
    A context manager: leaving it closes every file.
    """

    def __init__(self, files: dict[Path, SafetensorsFile], file_of: dict[str, Path]) -> None:
        self.files = files
        self.file_of = file_of

    def entry(self, name: str) -> Entry:
        return self.files[self.file_of[name]].entries[name]

    def check_unchanged(self) -> None:
        """Raise CheckpointError naming the first file written or replaced since it was opened."""
        for file in self.files.values():
            file.check_unchanged()

    def close(self) -> None:
        for file in self.files.values():
            file.close()

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(path: str | os.PathLike) -> SafetensorsCheckpoint:
    """Resolve and open the safetensors checkpoint at `path` (see the module docstring).

    `path` is a `.safetensors` file, an index (`*.index.json`), or a directory holding
    `model.safetensors.index.json`, else `model.safetensors`, else a single `*.safetensors.index.json`
    or `*.safetensors`. Raises FileNotFoundError for a path, or a file an index names, that does
    not exist; CheckpointError, naming the file and the entry, for a malformed index, an index
    naming a file outside its directory or a tensor its shard lacks or another shard also holds,
    a file that is not valid safetensors, and a torch.save file (saying how to convert it).
    """
    path = Path(path)
    if path.is_dir():
        path = _checkpoint_in(path)
    if not path.is_file():
        raise FileNotFoundError(f"no safetensors checkpoint at {path}")
    if path.name.endswith(".json"):
        return _open_index(path)
    file = SafetensorsFile(path)
    return SafetensorsCheckpoint({path: file}, dict.fromkeys(file.entries, path))


def _checkpoint_in(directory: Path) -> Path:
    for name in (INDEX, SINGLE):
        if (directory / name).is_file():
            return directory / name
    for pattern in ("*.safetensors.index.json", "*.safetensors"):
        found = sorted(directory.glob(pattern))
        if len(found) == 1:
            return found[0]
    torch_files = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth")
                         and p.is_file() and is_torch_file(p))
    if torch_files:
        raise CheckpointError(f"{directory} holds no safetensors checkpoint, only torch.save file(s) "
                              f"({', '.join(torch_files)}). " + torch_file_message(directory / torch_files[0]))
    raise FileNotFoundError(f"{directory} holds neither {INDEX} nor {SINGLE} (nor a single *.safetensors file): "
                            "not a safetensors checkpoint")


def _open_index(index: Path) -> SafetensorsCheckpoint:
    weight_map = _weight_map(index)
    roots = _allowed_roots(index)
    real: dict[str, Path] = {}  # file name as the index writes it -> the file it resolves to
    for name, file in weight_map.items():
        if file not in real:
            real[file] = _inside(index, roots, name, file)
    absent = sorted({str(index.parent / file) for file, target in real.items() if not target.is_file()})
    if absent:
        raise FileNotFoundError(f"{index} names file(s) that do not exist: {', '.join(absent)}")
    files: dict[Path, SafetensorsFile] = {}
    try:
        for target in dict.fromkeys(real.values()):
            files[target] = SafetensorsFile(target)
        file_of = {name: real[file] for name, file in weight_map.items()}
        _check_shards(index, weight_map, real, files, file_of)
    except BaseException:
        for opened in files.values():
            opened.close()
        raise
    return SafetensorsCheckpoint(files, file_of)


def _weight_map(index: Path) -> dict[str, str]:
    try:
        content = json.loads(index.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{index} is not valid JSON ({error}): a Hugging Face index is an object whose "
                              "'weight_map' maps each tensor name to its file") from None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if weight_map is None:
        raise CheckpointError(f"{index} has no 'weight_map': expected a Hugging Face index such as {INDEX}, "
                              "whose 'weight_map' maps each tensor name to its file")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: its 'weight_map' must map tensor names to file names "
                              f"(got a {type(weight_map).__name__})")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file:
            raise CheckpointError(f"{index}: weight_map entry {name!r} -> {file!r} is not a file name")
    return weight_map


def _allowed_roots(index: Path) -> list[Path]:
    """The directories an index's files may resolve into: its own, and its symlink target's (the hub cache)."""
    roots = [index.parent.resolve()]
    target = index.resolve().parent
    if index.is_symlink() and target not in roots:
        roots.append(target)
    return roots


def _inside(index: Path, roots: list[Path], name: str, file: str) -> Path:
    """The file `file` of entry `name` resolves to, refused unless it lies inside one of `roots`."""
    reason = None
    if os.path.isabs(file) or PurePath(file).anchor:
        reason = "an absolute path"
    elif ".." in PurePath(file).parts:
        reason = "a path through '..'"
    target = (index.parent / file).resolve()
    if reason is None and not any(target.is_relative_to(root) for root in roots):
        reason = f"a symlink to {target}"
    if reason is not None:
        raise CheckpointError(f"{index}: weight_map entry {name!r} -> {file!r} is {reason}, outside the index's "
                              f"directory {index.parent}: an index may name only files inside its own directory")
    return target


def _check_shards(index: Path, weight_map: dict[str, str], real: dict[str, Path],
                  files: dict[Path, SafetensorsFile], file_of: dict[str, Path]) -> None:
    """Each tensor in the shard the index names, and in no other one."""
    for name, file in weight_map.items():
        if name not in files[file_of[name]].entries:
            raise CheckpointError(f"{index}: weight_map puts {name!r} in {file} ({file_of[name]}), but that file "
                                  "does not hold it: the index and its shards disagree")
    named = {target: file for file, target in real.items()}
    for target, opened in files.items():
        for name in opened.entries:
            home = file_of.get(name)
            if home is not None and home != target:
                raise CheckpointError(f"{index}: tensor {name!r} is in two shards, {home} (where weight_map puts "
                                      f"it) and {target} ({named[target]}): remove the stale copy, or fix the "
                                      "index")
