"""`tl.export`: the trained model alone, as safetensors, streamed one tensor at a time to rank 0.

Two forms:

- one file (the default): `tl.export(state, "model.safetensors")`, loadable with
  `safetensors.torch.load_model` or `tl.load_weights`;
- a Hugging Face directory (`hf_index=True`): `model-00001-of-0000N.safetensors` files of at most
  `max_shard_size` bytes each, `model.safetensors.index.json` (`metadata.total_size`,
  `weight_map`), and the model's `config.json` (and `generation_config.json`) when it has a
  Hugging Face config, so `AutoModelForCausalLM.from_pretrained(path)` loads it as it is.

Memory: every rank plans the files from shapes and dtypes alone (`trainloop.models.hf_export`),
each file's header is written first, then its tensors one at a time: a sharded tensor (FSDP2,
HSDP, TP: a DTensor) is cast to `dtype` on its shards, gathered whole (`full_tensor`, every
rank), written by rank 0 and dropped. So a rank holds at most one whole tensor beyond its
shards, never a shard file, never the model.

Atomic, like a checkpoint: written under a temporary name of its own beside `path`, fsynced,
then renamed into place; a failure leaves what was at `path` before. A directory at `path` is
replaced only when it holds nothing but what an export writes (so tokenizer files are never
deleted: export elsewhere, or move them). Rank 0's failure reaches every rank (CheckpointError),
after the collectives it still takes part in, so no rank is left waiting.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trainloop.checkpoint.files import HashingFile, fsync
from trainloop.checkpoint.writing import _replace_dir, _unique
from trainloop.collectives import broadcast
from trainloop.errors import CheckpointError
from trainloop.forwarding import unwrap
from trainloop.models.hf import INDEX
from trainloop.models.hf_export import (
    ExportKeyMap,
    Planned,
    gather,
    parse_size,
    plan,
    release_freed,
    save_config,
    shard_groups,
)
from trainloop.models.safetensors_file import layout

if TYPE_CHECKING:
    from trainloop.state import RunState

# What an export directory holds: a directory holding anything else is not replaced.
_EXPORTED = re.compile(r"model-\d{5}-of-\d{5}\.safetensors|model\.safetensors(\.index\.json)?|"
                       r"config\.json|generation_config\.json")


def export(state: RunState, path: str | os.PathLike, model: nn.Module | None = None, *,
           dtype: torch.dtype | None = None, hf_index: bool = False, max_shard_size: int | str = "5GB",
           key_map: ExportKeyMap | None = None,
           transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> Path:
    """Write the model's weights to `path` (see the module docstring); call on every rank."""
    if model is None:
        if len(state.models) != 1:
            raise ValueError(f"export needs model= when the run prepared {len(state.models)} models")
        model = state.models[0]
    if not hf_index and max_shard_size != "5GB":
        raise ValueError("max_shard_size cuts an hf_index=True export into files: pass hf_index=True, or "
                         "leave max_shard_size out for one file")
    path = Path(path)
    module = unwrap(model)
    planned, tensors, tied = plan(module, dtype, key_map)  # the same on every rank: nothing raised yet differs
    groups = shard_groups(planned, parse_size(max_shard_size)) if hf_index else [planned]
    # Every header is laid out before anything is written: a dtype safetensors lacks raises here, on every rank.
    orders = [_file_order(group) for group in groups]
    temporary = _unique(path, "partial")
    failure = _verdict(state, lambda: _start(path, temporary, hf_index))
    if failure is not None:
        raise CheckpointError(failure)
    files = _file_names(path, hf_index, len(groups))
    metadata = {"format": "pt"}
    if not hf_index and key_map is None:
        metadata.update(tied)  # safetensors' save_model records a tied name left out so
    error = None
    for group, name, order in zip(groups, files, orders, strict=True):
        handle = None
        if state.is_main and error is None:
            try:
                handle = _open_shard(temporary / name if hf_index else temporary, group, metadata)
            except Exception as raised:  # reported to every rank below
                error = raised
        for tensor in sorted(group, key=order):
            # Collective for a sharded tensor: every rank gathers every tensor, in the same order.
            whole = gather(tensors[tensor.source], tensor.dtype, wanted=handle is not None)
            if handle is not None and whole is not None:
                try:
                    if transform is not None:
                        whole = _transformed(transform, tensor, whole)
                    if whole.numel():
                        handle.write(whole.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
                except Exception as raised:  # reported to every rank below
                    error, handle = raised, _closed(handle)
            del whole
            release_freed(tensor.nbytes)  # so that the gathered tensors' memory does not pile up
        if handle is not None:
            handle.close()
    failure = _verdict(state, lambda: _finish(module, path, temporary, hf_index, groups, files, dtype, error))
    if failure is not None:
        raise CheckpointError(failure)
    return path


def _transformed(transform: Callable[[str, torch.Tensor], torch.Tensor], tensor: Planned,
                 whole: torch.Tensor) -> torch.Tensor:
    """`transform(name, whole)`, which must keep the shape and dtype the file's header was written with."""
    out = transform(tensor.name, whole)
    if not isinstance(out, torch.Tensor) or out.shape != whole.shape or out.dtype != whole.dtype:
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"transform({tensor.name!r}) returned {got}, not {tuple(whole.shape)} {whole.dtype}: "
                         "it may change a tensor's values (a permutation), not its shape or dtype")
    return out


def _start(path: Path, temporary: Path, hf_index: bool) -> None:
    """Check that `path` may be written (rank 0); make the temporary directory of a directory export."""
    if hf_index:
        if path.exists() and not path.is_dir():
            raise CheckpointError(f"{path} is a file: an hf_index=True export writes a directory there; "
                                  "pass a directory's path, or hf_index=False for one file")
        if path.is_dir():
            foreign = sorted(p.name for p in path.iterdir() if not _EXPORTED.fullmatch(p.name))
            if foreign:
                raise CheckpointError(f"{path} holds files an export does not write ({', '.join(foreign[:5])}): "
                                      "it would replace them; export into a new directory, then add them")
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.mkdir()
    else:
        if path.is_dir():
            raise CheckpointError(f"{path} is a directory: pass a file's path (model.safetensors), or "
                                  "hf_index=True to write a Hugging Face directory there")
        path.parent.mkdir(parents=True, exist_ok=True)


def _file_names(path: Path, hf_index: bool, count: int) -> list[str]:
    if not hf_index:
        return [path.name]
    return [f"model-{index:05d}-of-{count:05d}.safetensors" for index in range(1, count + 1)]


def _file_order(group: list[Planned]):
    _, order = layout({t.name: (t.dtype, t.shape) for t in group})
    position = {name: index for index, name in enumerate(order)}
    return lambda tensor: position[tensor.name]


def _open_shard(file: Path, group: list[Planned], metadata: dict[str, str]) -> HashingFile:
    header, _ = layout({t.name: (t.dtype, t.shape) for t in group}, metadata)
    handle = HashingFile(file, None)
    try:
        handle.write(header)
    except BaseException:
        _closed(handle)
        raise
    return handle


def _closed(handle: HashingFile) -> None:
    os.close(handle.fd)


def _finish(module: nn.Module, path: Path, temporary: Path, hf_index: bool,
            groups: list[list[Planned]], files: list[str], dtype: torch.dtype | None,
            error: BaseException | None) -> None:
    """Rank 0: the index and config, then the rename into place; or remove what was written."""
    try:
        if error is not None:
            raise error
        if hf_index:
            weight_map = {t.name: file for group, file in zip(groups, files, strict=True) for t in group}
            total = sum(t.nbytes for group in groups for t in group)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            handle = HashingFile(temporary / INDEX, None)
            handle.write(json.dumps(index, indent=2, sort_keys=True).encode())
            handle.close()
            for name in save_config(module, temporary, dtype):
                fsync(temporary / name)
            fsync(temporary)
            _replace_dir(temporary, path)
        else:
            os.replace(temporary, path)
        fsync(path.parent)
    except BaseException:
        _remove(temporary)
        raise


def _remove(temporary: Path) -> None:
    if temporary.is_dir():
        for file in temporary.iterdir():
            file.unlink(missing_ok=True)
        temporary.rmdir()
    else:
        temporary.unlink(missing_ok=True)


def _verdict(state: RunState, work: Any) -> str | None:
    """Run `work` on rank 0; its failure's message (or None) on every rank."""
    message = None
    if state.is_main:
        try:
            work()
        except Exception as error:  # every rank raises it
            message = f"export failed on rank 0: {error}" if not isinstance(error, CheckpointError) else str(error)
    return broadcast(state, message) if state.world_size > 1 else message

