"""FSDP2 for `init(strategy="fsdp")`: shard models, bind optimizers, sharded checkpoints.

`prepare` calls `shard` for each model: rank 0's parameters and buffers are broadcast, then
`torch.distributed.fsdp.fully_shard` wraps each block (innermost first) and finally the root.
Blocks are the modules whose class names `init(fsdp_blocks="Block,Head")` gives, or by default
the children of the model's largest `nn.ModuleList` (a transformer's layers); a model with
neither is sharded at the root only, with a warning. Each block's parameters are gathered for
its forward and backward and freed after, so a rank holds one block unsharded at a time.

Sharding replaces every parameter by a new `DTensor` parameter. An optimizer built before
`prepare` still points at the old ones; `bind_optimizer` swaps its param groups over to the
shards in place, so the optimizer object (and any scheduler stepping it) stays the same.

Checkpoints go through `torch.distributed.checkpoint` (DCP): every rank writes its shards, and
a later run at any world size reads the pieces it needs. DCP has no checksums and unpickles
its `.metadata` with plain `pickle` (FIELD-NOTES), so `trainloop.checkpoint` hash-checks every
file first and DCP reads them here only through `_VerifiedReader`: the metadata through an
unpickler that knows DCP's few metadata classes and nothing else, data only from files the
manifest lists. Only tensors go into DCP: non-tensor optimizer state (hyperparameters, counts)
travels in the checkpoint's own `optimizer.pt`, loaded with `weights_only=True`, so DCP never
reaches the unpickling load it uses for byte entries (weights_only off).

This module imports torch.distributed.fsdp and .checkpoint (about 0.6 s): `prepare` and the
checkpoint functions import it only for FSDP runs and sharded checkpoints.
"""

from __future__ import annotations

import atexit
import itertools
import pickle
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from trainloop.checkpoint import CheckpointError
from trainloop.precision import AUTOCAST_DTYPES
from trainloop.topology import leave_process_group

if TYPE_CHECKING:
    from trainloop.state import RunState

METADATA = ".metadata"  # DCP's metadata file, written last: a checkpoint that holds one is sharded

# -- sharding ----------------------------------------------------------------------------------


def shard(state: RunState, model: nn.Module) -> dict[int, nn.Parameter]:
    """Apply FSDP2 to `model` (already on `state.device`), in place: each block, then the root.

    Returns id(parameter before sharding) -> the shard that replaced it, for `bind_optimizer`.

    Afterwards its parameters are `DTensor` shards over all ranks. Parameters and
    buffers are rank 0's on every rank. Mixed precision follows `state.config.precision`: under
    bf16 (and fp8) and fp16 the gathered parameters and the compute are in that dtype while the
    sharded parameters, the optimizer and the gradient reduction stay fp32. On one process a
    single-rank process group is joined, so the run is the same FSDP program at any world size.
    Raises ValueError if `fsdp_blocks` names a class the model does not contain.
    """
    config = state.config
    blocks = find_blocks(model, config.fsdp_blocks)
    _join_single_process_group(state.device)
    if state.world_size > 1:
        _broadcast_from_rank0(model)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    options: dict[str, Any] = {
        "mesh": init_device_mesh(state.device.type, (dist.get_world_size(),)),
        "mp_policy": mixed_precision(config.precision),
        "offload_policy": (CPUOffloadPolicy(pin_memory=state.device.type != "cpu")
                           if config.fsdp_cpu_offload else OffloadPolicy()),
    }
    for block in blocks:
        fully_shard(block, reshard_after_forward=config.fsdp_reshard_after_forward, **options)
    # The root's parameters are needed again as soon as backward starts: keep them gathered.
    fully_shard(model, reshard_after_forward=False, **options)
    return {key: model.get_parameter(name) for key, name in names.items()}


def find_blocks(model: nn.Module, class_names: str = "") -> list[nn.Module]:
    """The submodules that `fully_shard` wraps one by one, innermost first.

    `class_names` ("Block" or "Block,Head"): every submodule of those classes. Empty: the
    children that hold parameters of the model's largest `nn.ModuleList` (by parameter count),
    and none (a warning: the root alone is sharded, and gathered whole) when it has none.
    Raises ValueError naming the classes the model does not contain.
    """
    if class_names:
        wanted = {name.strip() for name in class_names.split(",")}
        found = [m for m in model.modules() if m is not model and type(m).__name__ in wanted]
        missing = wanted - {type(m).__name__ for m in found}
        if missing:
            present = sorted({type(m).__name__ for m in model.modules()})
            raise ValueError(
                f"fsdp_blocks names {sorted(missing)}, but {type(model).__name__} has no submodule "
                f"of that class; its module classes are {present}"
            )
        return found[::-1]  # modules() is pre-order: reversed, inner blocks come before outer ones
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    largest = max(lists, key=_parameter_count, default=None)
    if largest is None or _parameter_count(largest) == 0:
        warnings.warn(
            f"strategy='fsdp' found no blocks in {type(model).__name__} (no nn.ModuleList holding "
            "parameters): only the root is sharded, so forward and backward gather the whole model "
            "at once. Name the block classes with init(fsdp_blocks='MyBlock') to shard per block.",
            UserWarning, stacklevel=2)
        return []
    return [child for child in largest if _parameter_count(child) > 0]


def _parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """FSDP's policy for a trainloop precision: compute in the autocast dtype, reduce in fp32.

    fp32 and bf16-true get no policy: their parameters already have the compute dtype.
    """
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def _join_single_process_group(device: torch.device) -> None:
    """fully_shard needs a process group; one process has none yet, so join one of one rank.

    The store lives in this process (no port, no rendezvous). `finish` leaves only the groups
    `init` joined, so this one is left at exit, before gloo's threads meet a dying interpreter.
    """
    if dist.is_initialized():
        return
    dist.init_process_group(dist.get_default_backend_for_device(device), store=dist.HashStore(),
                            rank=0, world_size=1)
    atexit.register(leave_process_group)


def _broadcast_from_rank0(model: nn.Module) -> None:
    """Make every rank's parameters and buffers rank 0's, as DDP's constructor does."""
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            dist.broadcast(tensor.detach(), src=0)


# -- optimizers --------------------------------------------------------------------------------


def bind_optimizer(optimizer: torch.optim.Optimizer, replaced: dict[int, nn.Parameter]) -> None:
    """Point `optimizer`'s param groups at the sharded parameters, in place.

    Each parameter the optimizer holds is swapped for the shard that replaced it (`replaced`,
    from `shard`); parameters that are already shards stay. The optimizer
    object, its hyperparameters and any scheduler built on it are unchanged. Raises ValueError,
    changing nothing, if the optimizer has already stepped (its state is not sharded) or holds a
    tensor that is not a parameter of a model prepared with strategy='fsdp'.
    """
    name = type(optimizer).__name__
    if optimizer.state:
        raise ValueError(
            f"{name} has already taken steps: its state cannot be moved onto FSDP's shards. "
            "Prepare the optimizer before its first step"
        )
    bound = []
    for group in optimizer.param_groups:
        stray = sum(id(p) not in replaced and not isinstance(p, DTensor) for p in group["params"])
        if stray:
            raise ValueError(
                f"{name} holds {stray} tensor(s) that are not parameters of a model prepared with "
                "strategy='fsdp' (FSDP replaces each parameter by its shard, so these would never "
                "get a synchronised gradient). Build the optimizer from model.parameters() and pass "
                "it to the same tl.prepare call as its model, or build it after prepare"
            )
        bound.append([replaced.get(id(p), p) for p in group["params"]])
    for group, params in zip(optimizer.param_groups, bound):
        group["params"][:] = params  # in place: optimizers that keep this list (LBFGS) see the shards


# -- sharded checkpoints -----------------------------------------------------------------------


def save_sharded(models: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer],
                 directory: Path) -> list[dict[str, Any]]:
    """Write this rank's shards of the models' and optimizers' tensors into `directory` (DCP).

    Call on every rank (a collective). Returns each optimizer's non-tensor state
    (`{"state": ..., "param_groups": ...}`, parameters named by their fully qualified names),
    the same on every rank: the caller stores it with the checkpoint's other plain state.
    Raises DCP's CheckpointException (a BaseException) on every rank if a rank's write failed.
    """
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
    dcp.save(tensors, storage_writer=FileSystemWriter(directory))
    return plain


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
        set_optimizer_state_dict(container, optimizer, {"state": state, "param_groups": plain["param_groups"]})


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole, unsharded state dict on rank 0's CPU (empty on the other ranks).

    A collective: call on every rank. Gathers one tensor at a time, so rank 0 needs CPU memory
    for the model, and each device only for one parameter.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


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
