"""Sharded checkpoints through torch.distributed.checkpoint (DCP), read safely.

A strategy whose checkpoints are sharded (`Strategy.sharded`: FSDP2) has every rank write its
shards with `save_sharded`; a later run at any world size, sharded or not, reads the pieces it
needs with `load_sharded`.

DCP has no checksums and unpickles its `.metadata` with plain `pickle`, so
`trainloop.checkpoint` hash-checks every file first and DCP reads them here only through
`_VerifiedReader`: the metadata through an unpickler that knows DCP's few metadata classes and
nothing else, data only from files the manifest lists. Only tensors go into DCP: non-tensor
optimizer state (hyperparameters, counts) travels in the checkpoint's own `optimizer.pt`,
loaded with `weights_only=True`, so DCP never reaches the unpickling load it uses for byte
entries (weights_only off).

In the background (`tl.save(..., background=True)`), `AsyncShards` stages the shards to CPU and
starts DCP's `async_save` on a process group of the run's saves alone; the commit around it is
`trainloop.checkpoint.sharded_async`'s.

This module imports torch.distributed.checkpoint (about 0.5 s): the checkpoint functions import
it only for sharded checkpoints.
"""

from __future__ import annotations

import datetime
import pickle
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.staging import AsyncStager, BlockingAsyncStager
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from trainloop.errors import CheckpointError
from trainloop.optimizers import stepping

METADATA = ".metadata"  # DCP's metadata file, written last: a checkpoint that holds one is sharded


def sharded_state(models: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer]
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """This rank's shards of the models' and optimizers' tensors (what DCP writes, live: not
    copies), and each optimizer's non-tensor state (`{"state": ..., "param_groups": ...}`,
    parameters named by their fully qualified names), the same on every rank."""
    container = nn.ModuleList(models)
    tensors: dict[str, Any] = {"model": get_model_state_dict(container)}
    plain = []
    for index, optimizer in enumerate(optimizers):
        if optimizer.state:
            state_dict = get_optimizer_state_dict(container, optimizer)
        else:
            # get_optimizer_state_dict would create the missing state with a zero step, and a
            # run that saved before its first step would then train unlike one that did not.
            state_dict = {"state": {}, "param_groups": _named_param_groups(container, optimizer)}
        tensors[f"optimizer.{index}"] = {key: _tensors(values) for key, values in state_dict["state"].items()}
        plain.append({
            "state": {key: _non_tensors(values) for key, values in state_dict["state"].items()},
            "param_groups": state_dict["param_groups"],
        })
    return tensors, plain


def save_sharded(models: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer],
                 directory: Path) -> list[dict[str, Any]]:
    """Write this rank's shards of the models' and optimizers' tensors into `directory` (DCP).

    Call on every rank (a collective). Returns each optimizer's non-tensor state (see
    `sharded_state`): the caller stores it with the checkpoint's other plain state.
    Raises DCP's CheckpointException (a BaseException) on every rank if a rank's write failed.
    """
    tensors, plain = sharded_state(models, optimizers)
    dcp.save(tensors, storage_writer=FileSystemWriter(directory))
    return plain


class AsyncShards:
    """What a run's background sharded saves share: a process group of their own and the
    staging copies.

    The group is gloo, made once per run (a collective: every rank makes it at the same save).
    DCP's collectives run on the writer thread while training's run on the main thread; on one
    group the two streams would interleave differently on different ranks and mismatch. Gloo
    also gives DCP the CPU backend `async_save` needs beside an nccl training group.
    """

    def __init__(self, timeout_s: float) -> None:
        # The run's collective timeout, as for a synchronous save: a rank that stops answering
        # fails the save on the others instead of holding the writer thread for torch's default.
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        assert isinstance(group, dist.ProcessGroup)  # every rank is a member: never the "not in it" value
        self.group = group
        self._stager: BlockingAsyncStager | None = None
        self._layout: Any = None

    def stage(self, tensors: dict[str, Any]) -> dict[str, Any]:
        """CPU copies of `tensors` (DTensors stay DTensors of CPU shards), taken now.

        From an accelerator the copies go into pinned buffers kept for the next save of the
        same layout (DCP's cached staging); a CPU run copies afresh (pinning needs a device).
        """
        layout = _layout(tensors)
        on_accelerator = any(device != "cpu" for _, _, _, device in layout)
        if self._stager is None or layout != self._layout:
            # A new layout (the optimizer state appears at the first step) gets new buffers.
            self._stager = BlockingAsyncStager(cache_staged_state_dict=on_accelerator)
            self._layout = layout
        return self._stager.stage(tensors)

    def start(self, staged: dict[str, Any], directory: Path) -> Future:
        """Begin writing the staged shards into `directory` (every rank: DCP's collectives run on
        this object's group, on DCP's own thread); the Future of DCP's save, which raises DCP's
        CheckpointException on every rank if a rank's write failed."""
        response = dcp.async_save(staged, storage_writer=FileSystemWriter(directory), process_group=self.group,
                                  async_stager=_AlreadyStaged())
        # A stager whose `stage` returns the dict itself gets the plain upload Future back; one that
        # staged asynchronously would get an AsyncSaveResponse holding it.
        return response if isinstance(response, Future) else response.upload_completion

    def close(self) -> None:
        self._stager = None
        dist.destroy_process_group(self.group)


class _AlreadyStaged(AsyncStager):
    """`AsyncShards.stage` has copied the tensors already: DCP's staging copies nothing more."""

    _synchronize_after_execute = False

    def stage(self, state_dict: Any) -> Any:
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def _layout(tree: dict[str, Any], prefix: str = "") -> tuple:
    """Each tensor's key, shape, dtype and device: staging buffers fit a layout."""
    out: list = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out.extend(_layout(value, f"{prefix}{key}."))
        else:
            out.append((f"{prefix}{key}", tuple(value.shape), value.dtype, value.device.type))
    return tuple(out)


def load_sharded(models: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer],
                 directory: Path, files: Iterable[str], plain_optimizers: Sequence[dict]) -> None:
    """Load a sharded checkpoint into the models and optimizers, whatever the world size.

    `directory`'s `files` (names) must already be verified against the manifest: DCP reads no
    other file. `plain_optimizers` is what `save_sharded` returned when saving. Call on every
    rank; the models may be sharded or plain (a single process). Raises CheckpointError for
    metadata that is not plain DCP metadata, ValueError listing the tensors that do not fit.
    """
    container = nn.ModuleList(models)
    # DCP loads into tensors allocated and sharded as this run needs them; for the optimizers,
    # get_optimizer_state_dict creates them (with a zero step that the loaded state replaces).
    tensors: dict[str, Any] = {"model": get_model_state_dict(container)}
    for index, (optimizer, plain) in enumerate(zip(optimizers, plain_optimizers)):
        with stepping():  # DCP creates the state by stepping it (zero gradients, zero lr)
            state = get_optimizer_state_dict(container, optimizer)["state"]
        tensors[f"optimizer.{index}"] = {key: _tensors(state.get(key, {})) for key in plain["state"]}
    reader = _VerifiedReader(directory, files)
    _check_fit(tensors, reader.read_metadata(), directory)
    with warnings.catch_warnings():
        # A single process without a process group loads on its own: that is intended.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(tensors, storage_reader=reader)
    set_model_state_dict(container, tensors["model"])
    for index, (optimizer, plain) in enumerate(zip(optimizers, plain_optimizers)):
        loaded = tensors[f"optimizer.{index}"]
        state = {key: {**values, **loaded[key]} for key, values in plain["state"].items()}
        with stepping():
            set_optimizer_state_dict(container, optimizer, {"state": state, "param_groups": plain["param_groups"]})


def _tensors(values: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {name: value for name, value in values.items() if isinstance(value, torch.Tensor)}


def _non_tensors(values: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in values.items() if not isinstance(value, torch.Tensor)}


def _named_param_groups(container: nn.Module, optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The param groups as get_optimizer_state_dict gives them: parameters by qualified name."""
    names = {id(parameter): name for name, parameter in container.named_parameters()}
    return [{**group, "params": [names[id(p)] for p in group["params"]]} for group in optimizer.param_groups]


def _flat_shapes(tree: dict[str, Any], prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Tensor shapes by the dotted keys DCP stores them under."""
    shapes: dict[str, tuple[int, ...]] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            shapes.update(_flat_shapes(value, f"{prefix}{key}."))
        else:
            shapes[f"{prefix}{key}"] = tuple(value.shape)
    return shapes


def _check_fit(tensors: dict[str, Any], metadata: Metadata, directory: Path) -> None:
    """Raise ValueError listing what differs between the checkpoint and the run.

    Without this DCP would hang or fail deep inside on a key only some ranks miss; every rank
    reaches the same verdict here, from the same metadata and the same model.
    """
    expected = _flat_shapes(tensors)
    found = {key: tuple(entry.size) for key, entry in metadata.state_dict_metadata.items()}
    problems = [f"{key}: checkpoint {shape}, run {expected[key]}"
                for key, shape in found.items() if key in expected and expected[key] != shape]
    problems += [f"{key}: in the checkpoint, not in the run" for key in found if key not in expected]
    problems += [f"{key}: in the run, not in the checkpoint" for key in expected if key not in found]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(f"{directory} does not fit this run's models and optimizers: {shown}")


# -- reading DCP's files safely ----------------------------------------------------------------

# What DCP's own metadata pickles refer to (torch 2.10 - 2.13), and nothing else: no callable
# that could run code. The checkpoint id is a path (pathlib._local on Python 3.13+).
_METADATA_GLOBALS = frozenset({
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    *((module, cls) for module in ("pathlib", "pathlib._local")
      for cls in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
})


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: any other global (a `__reduce__` payload) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(
            f"refusing to read {METADATA}: it asks for {module}.{name}, which DCP metadata never "
            "holds; a checkpoint must never run code"
        )


class _VerifiedReader(FileSystemReader):
    """A FileSystemReader for a hash-verified checkpoint: safe metadata, listed files only."""

    def __init__(self, path: Path, files: Iterable[str]):
        super().__init__(path)
        self._files = frozenset(files)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with open(Path(self.path) / METADATA, "rb") as file:
            metadata = _MetadataUnpickler(file).load()
        self._check(metadata)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def _check(self, metadata: Any) -> None:
        """Plain tensors from the verified files, untransformed: what `save_sharded` writes."""
        where = Path(self.path) / METADATA
        if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
            raise CheckpointError(f"{where} is not DCP checkpoint metadata")
        if not all(isinstance(e, TensorStorageMetadata) for e in metadata.state_dict_metadata.values()):
            raise CheckpointError(f"{where} describes non-tensor entries, which trainloop never writes to DCP")
        for info in metadata.storage_data.values():
            if not isinstance(info, _StorageInfo) or info.relative_path not in self._files:
                raise CheckpointError(f"{where} points at data outside the checkpoint's verified files")
            if info.transform_descriptors:
                raise CheckpointError(f"{where} asks for storage transforms, which trainloop never writes")
