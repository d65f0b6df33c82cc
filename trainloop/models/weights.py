"""`load_weights`: a safetensors checkpoint into a model, each rank reading only its own slices.

    with tl.empty_weights():
        model = Transformer(config)                    # no memory
    state, model, optimizer = tl.prepare(state, model, optimizer)
    tl.load_weights(state, model, "checkpoint/")       # model.safetensors(.index.json)

The checkpoint is one `.safetensors` file, or a directory holding a Hugging Face
`model.safetensors.index.json` (its `weight_map` names the file of each tensor) or a single
`model.safetensors`, resolved by `trainloop.models.hf.open_checkpoint` (the resolver bigmodel
uses too: an index names files inside its directory only, each tensor in exactly one shard).
Only safetensors loads: a torch.save file is refused, saying how to convert it.

Each file is opened once, its header checked against its size, and held open for the whole
load; a tensor is read with plain reads straight into its destination (no memory map, no copy
when the dtypes agree): a parameter sharded as a `DTensor` (FSDP2, HSDP, tensor parallelism)
reads only the region its local shard covers, worked out from its placements; a whole parameter
(DDP, one process) reads the whole tensor. So a rank's peak memory is its shards, and at most a
16 MiB buffer when values change dtype on the way in, never the model. At the end every file is
checked to be the one the load began with (size, modification time, inode): a file written,
truncated or replaced meanwhile raises CheckpointError (the model may then hold a mix), never
a silent mix and never a SIGBUS.

The model is the one `prepare` returned (its wrappers are looked through: `tl.unwrap`) or the
user's module itself, also one built under `empty_weights()`: a parameter or buffer still on the
meta device is given its loaded value on `state.device`, in place (`torch.utils.swap_tensors`,
so an optimizer built on the meta parameters keeps working and tied weights stay tied). A
sharded parameter must already be materialised (prepare does that).

Names are the model's `state_dict` keys (parameters and persistent buffers); a tied tensor is
loaded once under whichever of its names the checkpoint has (Hugging Face files store one).

Dtypes: each value is converted to the model's dtype (as `load_state_dict` does): a bf16
file into an fp32 model is exact, an fp32 file into a bf16 model rounds to nearest. A floating
value is never loaded into an integer or boolean tensor or the other way round (ValueError).

Errors, raised before anything is loaded, every rank reaching the same verdict (so no rank is
left waiting for another): tensors of the model the checkpoint lacks (`strict=True`, the
default) or names the checkpoint has that the model lacks, shapes that differ, dtype kinds that
differ, a missing tensor left on the meta device or awaiting its load (`tl.empty_weights()`
tensors that no initialiser could fill, see `trainloop.models.meta`; also with `strict=False`),
a file that the index names but that does not exist, and every CheckpointError of the resolver.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from trainloop.forwarding import unwrap
from trainloop.models import meta
from trainloop.models.hf import SafetensorsCheckpoint, open_checkpoint
from trainloop.models.safetensors_file import Entry

if TYPE_CHECKING:
    from trainloop.state import RunState



class LoadResult(NamedTuple):
    """What `load_weights(strict=False)` left out, as torch's `load_state_dict` reports it."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def load_weights(state: RunState, model: nn.Module, path: str | Path, *, strict: bool = True) -> LoadResult:
    """Load the safetensors checkpoint at `path` into `model`, in place. See the module docstring.

    Call on every rank (no collective: each reads its own slices). Returns the keys left out
    (empty lists when `strict`). Raises FileNotFoundError for a path that is no checkpoint,
    ValueError for tensors that do not fit (all of them listed), CheckpointError for a malformed
    index or file, an index naming files outside its directory, or a torch.save file, all before
    loading any; CheckpointError after loading if a file changed while it was read.
    """
    module = unwrap(model)
    groups = _tensor_groups(module)
    with open_checkpoint(path) as checkpoint:
        plan, result = _plan(groups, checkpoint, strict, meta.awaiting_load(module))
        for name, tensor in plan:
            _load_one(checkpoint.entry(name), checkpoint, name, tensor, state.device)
        checkpoint.check_unchanged()
    meta.loaded(module, [tensor for names, tensor in groups if any(name in checkpoint.file_of for name in names)])
    return result


def _tensor_groups(module: nn.Module) -> list[tuple[list[str], torch.Tensor]]:
    """The model's parameters and persistent buffers: each tensor once, with all its names."""
    by_identity: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        by_identity.setdefault(id(tensor), ([], tensor))[0].append(name)
    return list(by_identity.values())


def _plan(groups, checkpoint: SafetensorsCheckpoint, strict: bool,
          awaiting: dict[int, str]) -> tuple[list[tuple[str, torch.Tensor]], LoadResult]:
    """Which checkpoint name loads into which tensor; every problem found, raised at once."""
    from torch.distributed.tensor import DTensor

    plan, missing, problems = [], [], []
    known: set[str] = set()
    for names, tensor in groups:
        known.update(names)
        found = next((name for name in names if name in checkpoint.file_of), None)
        if found is None:
            missing.extend(names)
            if tensor.is_meta or (isinstance(tensor, DTensor) and tensor.to_local().is_meta):
                problems.append(f"{names[0]}: not in the checkpoint, and still on the meta device")
            elif id(tensor) in awaiting:
                problems.append(f"{names[0]}: not in the checkpoint, and built on the meta device with nothing "
                                "to initialise it (it holds zeros until it is loaded)")
            continue
        stored = checkpoint.entry(found)
        shape, dtype = stored.shape, stored.dtype_name
        if shape != tuple(tensor.shape):
            problems.append(f"{found}: checkpoint shape {shape}, model shape {tuple(tensor.shape)}")
        elif _is_floating(dtype) != tensor.dtype.is_floating_point:
            problems.append(f"{found}: checkpoint dtype {dtype}, model dtype {tensor.dtype} (a floating "
                            "value is never loaded into an integer tensor, or the other way round)")
        elif isinstance(tensor, DTensor) and tensor.to_local().is_meta:
            problems.append(f"{found}: a sharded parameter still on the meta device; load after "
                            "tl.prepare, which materialises each rank's shards")
        else:
            plan.append((found, tensor))
    unexpected = sorted(set(checkpoint.file_of) - known)
    if strict and missing:
        problems.append(_listing("the model has tensor(s) the checkpoint lacks", missing))
    if strict and unexpected:
        problems.append(_listing("the checkpoint has tensor(s) the model lacks", unexpected))
    if problems:
        raise ValueError("the checkpoint does not fit the model (load_weights(..., strict=False) skips "
                         "missing and unexpected names): " + "; ".join(problems))
    return plan, LoadResult(missing, unexpected)


def _listing(what: str, names: list[str]) -> str:
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return f"{what}: {shown}"


def _is_floating(safetensors_dtype: str) -> bool:
    return safetensors_dtype.startswith(("F", "BF"))  # F64, F32, F16, BF16, F8_E4M3, F8_E5M2, ...


def _load_one(entry: Entry, checkpoint: SafetensorsCheckpoint, name: str, tensor: torch.Tensor,
              device: torch.device) -> None:
    """Read `name`'s values for `tensor` (this rank's region of it) and put them in, in place."""
    from torch.distributed.tensor import DTensor

    file = checkpoint.files[checkpoint.file_of[name]]
    with torch.no_grad():
        if isinstance(tensor, DTensor):
            _load_local(file, entry, tensor)
        elif tensor.is_meta:
            values = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
            file.read_into(entry, (), values)
            replacement = (nn.Parameter(values, requires_grad=tensor.requires_grad)
                           if isinstance(tensor, nn.Parameter) else values)
            torch.utils.swap_tensors(tensor, replacement)
        else:
            file.read_into(entry, (), tensor)


def _load_local(file: Any, entry: Entry, tensor: torch.Tensor) -> None:
    """This rank's part of `entry` into the DTensor `tensor`'s local shard: a region of the file when
    its placements are plain shards and replicas, else (strided shards) cut from the whole tensor.
    """
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = tensor.to_local()
    if all(type(p) in (Shard, Replicate) for p in tensor.placements):
        shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
        if tuple(shape) == tuple(local.shape):
            region = tuple(slice(start, start + size) for start, size in zip(offset, shape))
            file.read_into(entry, region, local)
            return
    # Placements whose local region is not one box of the global tensor (FSDP over TP's
    # _StridedShard): read the whole tensor and let DTensor cut this rank's part, no communication.
    whole = file.read(entry).to(device=local.device, dtype=local.dtype)
    local.copy_(distribute_tensor(whole, tensor.device_mesh, tensor.placements, src_data_rank=None).to_local())
