"""One safetensors file, held open for a whole load and read with plain reads, never a memory map.

The format: an 8-byte little-endian header length, a JSON header (tensor name -> dtype, shape
and the byte range of its data, `data_offsets`, counted from the end of the header), then the
data. `SafetensorsFile` checks the whole header against the file's size when it opens it, so a
hostile or truncated file is refused, naming the file and the entry, before any tensor is read.

Why reads and not safetensors' `safe_open` (a memory map): a mapped page read after the file
was truncated kills the process with SIGBUS, the pages a load touched count in the process's
resident memory until the mapping is closed, and re-opening a file to unmap them would read a
file replaced meanwhile. A read into the destination tensor's own memory has none of these:
past the end it comes back short (an error, not a signal), the page cache it goes through is
the kernel's, and the descriptor is the one file the load began with. `check_unchanged` then
says whether that file was written or replaced while it was read.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
from pathlib import Path
from typing import NamedTuple

import torch

from trainloop.errors import CheckpointError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER = 100 * 2**20  # safetensors' own limit: a larger header is refused, never parsed
CHUNK = 16 * 2**20  # bytes staged at a time when a value needs converting on its way in
CONVERT = ("from safetensors.torch import save_file; import torch; "
           "save_file(torch.load('pytorch_model.bin', weights_only=True), 'model.safetensors')")


class Entry(NamedTuple):
    """A tensor of the file: its name, dtype (as the file spells it and as torch's), shape, byte range."""

    name: str
    dtype_name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute offsets in the file
    end: int


def torch_file_message(path: Path) -> str:
    """What to say about a torch.save file given where a safetensors checkpoint was expected."""
    return (f"{path} is a torch.save file (a pickle), not safetensors: only safetensors files and "
            "Hugging Face index directories (model.safetensors.index.json) load, because loading a "
            "pickle can run code. Convert it once where you trust it, e.g. `" + CONVERT + "`")


def is_torch_file(path: Path) -> bool:
    """True for a file that starts as torch.save writes: a zip archive, or a bare pickle."""
    try:
        with open(path, "rb") as file:
            start = file.read(4)
    except OSError:
        return False
    return _torch_magic(start)


def _torch_magic(start: bytes) -> bool:
    # A zip archive (torch.save since 1.6), or a pickle of protocol 2 to 5 (the legacy format).
    return start[:4] == b"PK\x03\x04" or (start[:1] == b"\x80" and start[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


class SafetensorsFile:
    """A safetensors file opened once: its checked header (`entries`), reads, and a change check.

    Raises CheckpointError for a file that is not a valid safetensors file (naming the file, and
    the entry at fault), FileNotFoundError for one that does not exist.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 (held for the whole load)
        try:
            self._identity = _identity(os.fstat(self._file.fileno()))
            self.entries = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def _read_header(self) -> dict[str, Entry]:
        size = self._identity[0]
        start = self._pread(min(size, 8), 0)
        # Only a file that is not valid safetensors is checked for torch.save's signature: the
        # first bytes of a safetensors file are its header's length, which may be anything.
        if size < 8:
            if _torch_magic(start):
                raise CheckpointError(torch_file_message(self.path))
            raise CheckpointError(f"{self.path} is {size} bytes long: too short for a safetensors file")
        (length,) = struct.unpack("<Q", start)
        if (length > min(size - 8, MAX_HEADER) or self._pread(1, 8) != b"{") and _torch_magic(start):
            raise CheckpointError(torch_file_message(self.path))
        if length > min(size - 8, MAX_HEADER):
            raise CheckpointError(f"{self.path}: its header of {length} bytes is larger than the file of "
                                  f"{size} bytes (or than {MAX_HEADER} bytes): not a safetensors file, or "
                                  "a truncated one")
        try:
            header = json.loads(self._pread(length, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{self.path}: its header is not valid JSON ({error}): not a safetensors "
                                  "file, or a damaged one") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: its header is not a JSON object: not a safetensors file")
        data_start, data_size = 8 + length, size - 8 - length
        return {name: _entry(self.path, name, fields, data_start, data_size)
                for name, fields in header.items() if name != "__metadata__"}

    def _pread(self, nbytes: int, offset: int) -> bytes:
        self._file.seek(offset)
        return self._file.read(nbytes)

    def read(self, entry: Entry, region: tuple[slice, ...] = ()) -> torch.Tensor:
        """A new CPU tensor of `entry`'s values inside `region` (one slice per leading dim), in the file's dtype."""
        box = _box(entry.shape, region)
        out = torch.empty([stop - start for start, stop in box], dtype=entry.dtype)
        self._read_box(entry, box, out)
        return out

    def read_into(self, entry: Entry, region: tuple[slice, ...], out: torch.Tensor) -> None:
        """Put `entry`'s values inside `region` into `out` (that shape; any dtype and device).

        Straight into `out`'s memory when it is a contiguous CPU tensor of the file's dtype; else
        through a CPU buffer of at most CHUNK bytes at a time (`copy_` converts the dtype and moves it).
        """
        box = _box(entry.shape, region)
        if out.device.type == "cpu" and out.dtype == entry.dtype and out.is_contiguous():
            self._read_box(entry, box, out)
            return
        if not box:  # a 0-d tensor
            out.copy_(self.read(entry))
            return
        row_bytes = max(1, math.prod(stop - start for start, stop in box[1:]) * entry.dtype.itemsize)
        rows = max(1, CHUNK // row_bytes)
        first, last = box[0]
        for start in range(first, last, rows):
            stop = min(start + rows, last)
            part = torch.empty([stop - start, *(b - a for a, b in box[1:])], dtype=entry.dtype)
            self._read_box(entry, [(start, stop), *box[1:]], part)
            out[start - first: stop - first].copy_(part)

    def _read_box(self, entry: Entry, box: list[tuple[int, int]], out: torch.Tensor) -> None:
        """Fill the contiguous CPU tensor `out` with the box of `entry`, one read per contiguous run."""
        if out.numel() == 0:
            return
        itemsize = entry.dtype.itemsize
        # Dims after the last one the box cuts are whole: each run covers them all at once.
        cut = max((d for d, (start, stop) in enumerate(box) if (start, stop) != (0, entry.shape[d])), default=-1)
        strides = [math.prod(entry.shape[d + 1:]) for d in range(len(entry.shape))]
        run = (box[cut][1] - box[cut][0]) * strides[cut] * itemsize if cut >= 0 else out.numel() * itemsize
        buffer = (ctypes.c_char * (out.numel() * itemsize)).from_address(out.data_ptr())
        view = memoryview(buffer).cast("B")
        written = 0
        for index in _indices(box[:max(cut, 0)]):
            element = sum(i * strides[d] for d, i in enumerate(index)) + (box[cut][0] * strides[cut] if cut >= 0 else 0)
            self._read_exactly(view[written: written + run], entry.begin + element * itemsize, entry)
            written += run
        # Written behind autograd's back: bump the version, as an in-place op would.
        torch.autograd.graph.increment_version(out)

    def _read_exactly(self, view: memoryview, offset: int, entry: Entry) -> None:
        self._file.seek(offset)
        done = 0
        while done < len(view):
            count = self._file.readinto(view[done:])
            if not count:
                raise CheckpointError(f"{self.path} changed while it was being loaded (it ended before the "
                                      f"data of {entry.name!r}: truncated): load again once the file is complete")
            done += count

    def check_unchanged(self) -> None:
        """Raise CheckpointError if the file was written, truncated or replaced since it was opened."""
        now = _identity(os.fstat(self._file.fileno()))
        how = None
        if now[:2] != self._identity[:2]:
            how = "written to: its size or modification time moved"
        else:
            try:
                on_disk = _identity(os.stat(self.path))
            except FileNotFoundError:
                on_disk = None
            if on_disk is None:
                how = "removed"
            elif on_disk[2:] != self._identity[2:]:
                how = "replaced by another file"
        if how is not None:
            raise CheckpointError(f"{self.path} changed while it was being loaded ({how}): the model may hold "
                                  "a mix of the old and the new file's tensors. Load again once the file is "
                                  "complete")


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return stat.st_size, stat.st_mtime_ns, stat.st_dev, stat.st_ino


def _entry(path: Path, name: str, fields: object, data_start: int, data_size: int) -> Entry:
    """One header entry, checked: a known dtype, a shape, and a byte range inside the data that fits it."""
    if not (isinstance(fields, dict) and {"dtype", "shape", "data_offsets"} <= fields.keys()):
        raise CheckpointError(f"{path}: entry {name!r} must hold dtype, shape and data_offsets (got {fields!r:.80}): "
                              "not a safetensors file, or a damaged one")
    dtype_name, shape, offsets = fields["dtype"], fields["shape"], fields["data_offsets"]
    if dtype_name not in DTYPES:
        raise CheckpointError(f"{path}: entry {name!r} has dtype {dtype_name!r}, which is none of the "
                              f"safetensors dtypes torch holds ({', '.join(DTYPES)})")
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
        raise CheckpointError(f"{path}: entry {name!r} has shape {shape!r:.80}: expected a list of sizes >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{path}: entry {name!r} has data_offsets {offsets!r:.80}: expected [begin, end]")
    begin, end = offsets
    if end > data_size:
        raise CheckpointError(f"{path}: entry {name!r} at bytes {begin}-{end} of the data lies past the end of "
                              f"the file (its data holds {data_size} bytes): the file is truncated or damaged")
    dtype = DTYPES[dtype_name]
    needed = math.prod(shape) * dtype.itemsize
    if end - begin != needed:
        raise CheckpointError(f"{path}: entry {name!r} spans {end - begin} bytes, but {shape} {dtype_name} take "
                              f"{needed}: the file is damaged")
    return Entry(name, dtype_name, dtype, tuple(shape), data_start + begin, data_start + end)


def _box(shape: tuple[int, ...], region: tuple[slice, ...]) -> list[tuple[int, int]]:
    """`(start, stop)` in each dim: the region's slices (step 1) for the leading dims, the whole of the rest."""
    box = []
    for dim, size in enumerate(shape):
        if dim < len(region):
            start, stop, step = region[dim].indices(size)
            if step != 1:
                raise ValueError(f"region {region}: only slices of step 1 are read")
            box.append((start, max(start, stop)))
        else:
            box.append((0, size))
    return box


def _indices(box: list[tuple[int, int]]):
    """Every index inside `box`, the last dim fastest (the order of the file's data)."""
    if not box:
        yield ()
        return
    (start, stop), rest = box[0], box[1:]
    for i in range(start, stop):
        for tail in _indices(rest):
            yield (i, *tail)


# -- writing -----------------------------------------------------------------------------------

NAMES = {dtype: name for name, dtype in DTYPES.items()}


def layout(tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]],
           metadata: dict[str, str] | None = None) -> tuple[bytes, list[str]]:
    """The start of a safetensors file holding tensors of these dtypes and shapes (by name): its
    8-byte header length and JSON header, and the order in which their bytes must follow.

    Written before any tensor exists, so a writer can stream each tensor's bytes as it gets it.
    The order is safetensors' own (larger elements first, then by name), so every tensor stays
    aligned. Raises ValueError naming a dtype the format has no name for.
    """
    if struct.pack("=H", 1) != b"\x01\x00":
        raise ValueError("writing safetensors streams tensors' bytes as they are in memory: this host is "
                         "big-endian, the format little-endian; export on a little-endian host")
    unknown = sorted(f"{name} ({dtype})" for name, (dtype, _) in tensors.items() if dtype not in NAMES)
    if unknown:
        raise ValueError(f"safetensors has no dtype for {', '.join(unknown)}: pass dtype= to cast floating "
                         "tensors to one it has (torch.bfloat16, torch.float32)")
    order = sorted(tensors, key=lambda name: (-tensors[name][0].itemsize, name))
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        dtype, shape = tensors[name]
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(encoded)) + encoded, order
