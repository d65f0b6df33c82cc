"""`load_weights`: a safetensors checkpoint into a model, each rank reading only its own slices.

    with tl.empty_weights():
        model = Transformer(config)                    # no memory
    state, model, optimizer = tl.prepare(state, model, optimizer)
    tl.load_weights(state, model, "checkpoint/")       # model.safetensors(.index.json)

The checkpoint is one `.safetensors` file, or a directory holding a Hugging Face
`model.safetensors.index.json` (its `weight_map` names the file of each tensor) or a single
`model.safetensors`. Files are memory-mapped (safetensors' `safe_open`), and a tensor is read
one slice at a time: a parameter sharded as a `DTensor` (FSDP2, HSDP, tensor parallelism) reads
only the region its local shard covers, worked out from its placements; a whole parameter
(DDP, one process) reads the whole tensor. Each file is re-opened after every 16 MiB read
through it, which unmaps the pages read so far. So a rank's peak memory is its shards plus one
tensor slice in flight and a few MiB of mapped file, never the model.

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
differ, a missing tensor left on the meta device (also with `strict=False`), a file that the
index names but that does not exist.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from trainloop.forwarding import unwrap
from trainloop.models.hf import checkpoint_files

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
    ValueError for tensors that do not fit (all of them listed), before loading any.
    """
    module = unwrap(model)
    files = checkpoint_files(Path(path))
    groups = _tensor_groups(module)
    with contextlib.closing(_MappedFiles()) as mapped:
        plan, result = _plan(groups, files, mapped, strict)
        for name, tensor in plan:
            _load_one(mapped, files[name], name, tensor, state.device)
    return result


def _tensor_groups(module: nn.Module) -> list[tuple[list[str], torch.Tensor]]:
    """The model's parameters and persistent buffers: each tensor once, with all its names."""
    by_identity: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        by_identity.setdefault(id(tensor), ([], tensor))[0].append(name)
    return list(by_identity.values())


class _MappedFiles:
    """The checkpoint's files, opened with safe_open (memory-mapped) when first needed.

    A value read from a mapped file is a view of the mapping: the pages it touches count as this
    process's resident memory until the mapping is closed (with the kernel's large folios often
    twice the bytes asked for). Each file is therefore closed and re-opened after every
    `window` bytes read through it, so a load's resident file pages stay bounded, whatever the
    checkpoint's size. Re-opening re-reads only the file's header.
    """

    window = 16 * 2**20

    def __init__(self) -> None:
        self._open: dict[Path, Any] = {}
        self._read: dict[Path, int] = {}

    def reader(self, path: Path) -> Any:
        if path not in self._open:
            from safetensors import safe_open

            handle = safe_open(path, framework="pt", device="cpu")
            self._open[path] = (handle, handle.__enter__())
            self._read[path] = 0
        return self._open[path][1]

    def done_reading(self, path: Path, nbytes: int) -> None:
        """Count `nbytes` read from `path` (and already copied out of the mapping)."""
        self._read[path] += nbytes
        if self._read[path] >= self.window:
            self._close(path)

    def _close(self, path: Path) -> None:
        handle, _ = self._open.pop(path)
        handle.__exit__(None, None, None)

    def close(self) -> None:
        for path in list(self._open):
            self._close(path)


def _plan(groups, files, mapped: _MappedFiles, strict: bool) -> tuple[list[tuple[str, torch.Tensor]], LoadResult]:
    """Which checkpoint name loads into which tensor; every problem found, raised at once."""
    from torch.distributed.tensor import DTensor

    plan, missing, problems = [], [], []
    known: set[str] = set()
    for names, tensor in groups:
        known.update(names)
        found = next((name for name in names if name in files), None)
        if found is None:
            missing.extend(names)
            if tensor.is_meta or (isinstance(tensor, DTensor) and tensor.to_local().is_meta):
                problems.append(f"{names[0]}: not in the checkpoint, and still on the meta device")
            continue
        stored = mapped.reader(files[found]).get_slice(found)
        shape, dtype = tuple(stored.get_shape()), stored.get_dtype()
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
    unexpected = sorted(set(files) - known)
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


def _load_one(mapped: _MappedFiles, path: Path, name: str, tensor: torch.Tensor, device: torch.device) -> None:
    """Read `name`'s values for `tensor` (this rank's region of it) and put them in, in place."""
    from torch.distributed.tensor import DTensor

    reader = mapped.reader(path)
    with torch.no_grad():
        if isinstance(tensor, DTensor):
            local = tensor.to_local()
            local.copy_(_local_values(reader, name, tensor))
            nbytes = local.numel() * local.element_size()
        elif tensor.is_meta:
            # A copy (never a view of the mapped file) in the model's dtype, on the run's device.
            values = reader.get_tensor(name).to(device=device, dtype=tensor.dtype, copy=True)
            replacement = (nn.Parameter(values, requires_grad=tensor.requires_grad)
                           if isinstance(tensor, nn.Parameter) else values)
            torch.utils.swap_tensors(tensor, replacement)
            nbytes = values.numel() * values.element_size()
        else:
            tensor.copy_(reader.get_tensor(name))
            nbytes = tensor.numel() * tensor.element_size()
    mapped.done_reading(path, nbytes)


def _local_values(reader: Any, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of `name` for the DTensor `tensor`: a slice of the file when its
    placements are plain shards and replicas, else (strided shards) cut from the whole tensor.
    """
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = tensor.to_local()
    if all(type(p) in (Shard, Replicate) for p in tensor.placements):
        shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
        if tuple(shape) == tuple(local.shape):
            if local.numel() == 0:
                return local
            region = tuple(slice(start, start + size) for start, size in zip(offset, shape))
            return reader.get_slice(name)[region] if region else reader.get_tensor(name)
    # Placements whose local region is not one box of the global tensor (FSDP over TP's
    # _StridedShard): read the whole tensor and let DTensor cut this rank's part, no communication.
    whole = reader.get_tensor(name).to(device=local.device, dtype=local.dtype)
    return distribute_tensor(whole, tensor.device_mesh, tensor.placements, src_data_rank=None).to_local()
