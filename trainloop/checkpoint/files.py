"""The bytes of a checkpoint: files hashed as they are written, and read once, verified.

`trainloop.checkpoint` decides what goes into a checkpoint; this module only moves bytes, in one
pass each way:

- Writing: `write_file` creates a new file (mode 0o666, so the umask decides who may read it),
  hashes the bytes as they go to the disk, fsyncs it and returns its manifest record. Nothing is
  read back. `write_safetensors` streams tensors into it in the safetensors format without
  first building the whole file in memory.
- Reading: `read_verified` reads a file once, refusing symbolic links and anything that is not
  a regular file, and checks the bytes against the record before returning them: what is then
  deserialized is exactly what was hashed.

Hashes: XXH3-128 (the `xxhash` package, a dependency; 28 GB/s on one core of the development
machine: 4x BLAKE3 on one core, 2x BLAKE3 on two, 13x SHA-256) for new checkpoints; BLAKE3
(`blake3`) when `xxhash` is not installed, SHA-256 when neither is, and for format-1 checkpoints.
Every algorithm here stays readable. The manifest names the algorithm, and a record keys the
digest by it: `{"size": 4096, "xxh3_128": "9f86..."}`. Every failure to read is a CheckpointError.

Why a non-cryptographic hash is enough: the manifest sits beside the files it describes, so
whoever can rewrite a file can rewrite the manifest too, and no hash stored there, however
strong, authenticates a checkpoint. What the hash guards against is accidents: truncation,
torn or partial writes, bit rot, files mixed up between checkpoints. A 128-bit hash whose
every output bit depends on every input bit detects those as surely as SHA-256 does (a random
change goes unnoticed with probability 2^-128). Authenticity, where it matters, comes from
where the checkpoint is kept (permissions) or from signing its manifest.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import importlib.util
import io
import json
import math
import mmap
import os
import stat
import struct
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from trainloop.errors import CheckpointError

HASHES = ("xxh3_128", "blake3", "sha256")
_SPELLED = {"xxh3_128": "XXH3-128", "blake3": "BLAKE3", "sha256": "SHA-256"}
_PACKAGES = {"xxh3_128": "xxhash", "blake3": "blake3"}


@functools.cache
def default_hash() -> str:
    """The algorithm new checkpoints are hashed with: XXH3-128 (`xxhash`, installed with
    trainloop); BLAKE3 without it, SHA-256 without either. (Looked up at the first save, not at
    `import trainloop`.)"""
    return next((algorithm for algorithm, package in _PACKAGES.items()
                 if importlib.util.find_spec(package) is not None), "sha256")

_BLOCK = 8 << 20  # bytes per read when a file is only hashed: big enough for BLAKE3's threads


def new_hash(algorithm: str) -> Any:
    """A hashlib-style object (`update`, `hexdigest`) for `algorithm`, one of HASHES."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm in _PACKAGES:
        try:
            if algorithm == "xxh3_128":
                from xxhash import xxh3_128

                return xxh3_128()
            from blake3 import blake3

            return blake3(max_threads=blake3.AUTO)
        except ImportError:
            raise CheckpointError(f"this checkpoint is hashed with {_SPELLED[algorithm]}: "
                                  f"pip install {_PACKAGES[algorithm]} to read it") from None
    raise CheckpointError(f"unknown hash algorithm {algorithm!r} (this trainloop knows {', '.join(HASHES)})")


def hash_bytes(data: bytes, algorithm: str) -> str:
    digest = new_hash(algorithm)
    digest.update(data)
    return digest.hexdigest()


def fsync(path: Path) -> None:
    """fsync a file or a directory (a directory: so that the names in it are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- writing -----------------------------------------------------------------------------------


_OVERLAP_FROM = 1 << 20  # bytes from which a write is hashed beside it, not before it


@functools.cache
def _hasher() -> ThreadPoolExecutor:
    """The threads that hash large writes while they are written (one per file in flight)."""
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix="trainloop-hash")


class HashingFile:
    """A new file, written front to back: hashed as it is written, fsynced when closed.

    Created with mode 0o666 like `open` does, so the umask decides who may read it (safetensors'
    own writer makes its files 0o600). Never follows a symbolic link, never reuses a file. Has
    the `write`/`flush` that torch.save needs from a file object.
    """

    def __init__(self, file: Path, algorithm: str | None):
        self.fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        self.algorithm = algorithm
        self.digest = new_hash(algorithm) if algorithm is not None else None
        self.size = 0

    def write(self, data: Any) -> int:
        """Write and hash `data`; a large buffer is hashed on a helper thread while this one
        writes it (both release the GIL), so that the hash costs no time of its own."""
        view = memoryview(data).cast("B")
        hashing = None
        if self.digest is not None:
            if len(view) >= _OVERLAP_FROM:
                hashing = _hasher().submit(self.digest.update, view)
            else:
                self.digest.update(view)
        try:
            written = 0
            while written < len(view):
                written += os.write(self.fd, view[written:])
        finally:
            if hashing is not None:
                hashing.result()  # the digest is updated in order, before the next write
        self.size += len(view)
        return len(view)

    def flush(self) -> None:  # os.write has no buffer to flush
        pass

    def close(self) -> dict[str, Any]:
        """fsync and close; the file's manifest record."""
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
        if self.digest is None or self.algorithm is None:
            return {"size": self.size}
        return {"size": self.size, self.algorithm: self.digest.hexdigest()}


def write_file(file: Path, content: bytes | Callable[[HashingFile], None], algorithm: str | None) -> dict[str, Any]:
    """Write `content` (bytes, or a function that writes to the file object it is given) to the
    new `file`, fsynced; return its manifest record (hashed with `algorithm`; None: not hashed)."""
    handle = HashingFile(file, algorithm)
    try:
        if callable(content):
            content(handle)
        else:
            handle.write(content)
    except BaseException:
        os.close(handle.fd)
        raise
    return handle.close()


# safetensors' dtype names (its format specification); a dtype not here goes through its library.
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def write_safetensors(handle: HashingFile, tensors: Mapping[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write CPU `tensors` to `handle` as a safetensors file, one tensor at a time.

    The format: an 8-byte little-endian header size, a JSON header (dtype, shape and byte range of
    each tensor; padded with spaces to a multiple of 8) and the tensors' bytes back to back. The
    order is safetensors' own (larger elements first, then by name), so every tensor stays aligned.
    """
    if any(t.dtype not in _SAFETENSORS_DTYPES for t in tensors.values()) or struct.pack("=H", 1) != b"\x01\x00":
        from safetensors.torch import save  # exotic dtypes, big-endian hosts: the library's way

        handle.write(save(dict(tensors), metadata=metadata))
        return
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    handle.write(struct.pack("<Q", len(encoded)))
    handle.write(encoded)
    for name in order:
        tensor = tensors[name]
        if tensor.numel():
            handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


# -- reading -----------------------------------------------------------------------------------


def open_plain(file: Path) -> int:
    """A read-only descriptor of the regular file `file`; CheckpointError for anything else."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise CheckpointError(f"{file} is a symbolic link: a checkpoint holds plain files only") from None
        raise CheckpointError(f"cannot read {file}: {error.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{file} is not a regular file")
    return fd


def read_file(file: Path) -> bytes:
    """All of the regular file `file` (no symbolic link); CheckpointError when it cannot be read."""
    fd = open_plain(file)
    try:
        with os.fdopen(fd, "rb", buffering=0) as handle:
            return handle.readall()
    except OSError as error:
        raise CheckpointError(f"cannot read {file}: {error.strerror}") from None


def read_verified(file: Path, record: dict[str, Any], algorithm: str) -> None:
    """Read `file` once, a block at a time, and check its size and hash against its manifest
    `record`. CheckpointError naming the file if it is missing, unreadable, a symbolic link,
    truncated or changed."""
    fd = open_plain(file)
    try:
        _check_size(file, os.fstat(fd).st_size, record)
        digest = new_hash(algorithm)
        with os.fdopen(os.dup(fd), "rb", buffering=0) as handle:
            for block in iter(lambda: handle.read(_BLOCK), b""):
                digest.update(block)
    except OSError as error:
        raise CheckpointError(f"cannot read {file}: {error.strerror}") from None
    finally:
        os.close(fd)
    _check_digest(file, digest.hexdigest(), record, algorithm)


def map_listed(file: Path, record: dict[str, Any]) -> mmap.mmap | bytes:
    """The bytes of `file`, checked for size (not yet for their hash: `check_hash`), as a private
    copy-on-write memory map: deserializing from it copies each tensor once, where reading the
    file into freshly allocated memory first would fault in every page of it."""
    fd = open_plain(file)
    try:
        size = os.fstat(fd).st_size
        _check_size(file, size, record)
        return mmap.mmap(fd, size, access=mmap.ACCESS_COPY) if size else b""
    except OSError as error:
        raise CheckpointError(f"cannot read {file}: {error.strerror}") from None
    finally:
        os.close(fd)


def check_hash(file: Path, data: Any, record: dict[str, Any], algorithm: str) -> None:
    """CheckpointError unless `data` (the bytes `map_listed` gave for `file`) has the record's hash."""
    digest = new_hash(algorithm)
    digest.update(data)
    _check_digest(file, digest.hexdigest(), record, algorithm)


def _check_size(file: Path, size: int, record: dict[str, Any]) -> None:
    if size != record["size"]:
        raise CheckpointError(f"{file} is {size} bytes, the manifest says {record['size']} (truncated?)")


def _check_digest(file: Path, digest: str, record: dict[str, Any], algorithm: str) -> None:
    if digest != record[algorithm]:
        raise CheckpointError(f"{file} does not match its {_SPELLED[algorithm]} hash in the manifest "
                              "(changed or corrupted)")


class MemoryFile(io.RawIOBase):
    """A read-only, seekable file object over bytes or a memory map, with the `readinto` that
    lets torch.load copy each tensor straight into its storage (once)."""

    def __init__(self, data: Any):
        self._view = memoryview(data).cast("B") if len(data) else memoryview(b"")
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = max(0, min(len(buffer), len(self._view) - self._position))
        memoryview(buffer).cast("B")[:count] = self._view[self._position:self._position + count]
        self._position += count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        origin = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}[whence]
        self._position = max(0, origin + offset)
        return self._position

    def tell(self) -> int:
        return self._position


def read_safetensors(data: mmap.mmap | bytes, file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file's verified bytes, as views of `data` (no copy).

    The header is checked (dtypes, shapes, byte ranges inside the data); a file whose tensors are
    not aligned, or a big-endian host, goes through the safetensors library, which copies.
    """
    names = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}
    try:
        (length,) = struct.unpack_from("<Q", data)
        header = json.loads(bytes(data[8:8 + length]))
        start = 8 + length
        entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
        tensors, aligned = {}, sys.byteorder == "little"
        for name, entry in entries.items():
            dtype = names[entry["dtype"]]
            shape = [int(n) for n in entry["shape"]]
            begin, end = (int(n) for n in entry["data_offsets"])
            count = math.prod(shape)
            if min(shape, default=0) < 0 or begin < 0 or end - begin != count * dtype.itemsize \
                    or start + end > len(data):
                raise ValueError(f"the byte range of {name!r} does not match its shape")
            aligned &= (start + begin) % dtype.itemsize == 0
            tensors[name] = (torch.frombuffer(data, dtype=dtype, count=count, offset=start + begin).reshape(shape)
                             if count else torch.empty(shape, dtype=dtype))
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError,
            AttributeError) as error:
        if isinstance(error, KeyError) and error.args and error.args[0] in _LIBRARY_DTYPES:
            aligned = False  # a dtype only the library knows
        else:
            raise CheckpointError(f"{file} is not a safetensors file: {error}") from None
    if aligned:
        return tensors
    from safetensors.torch import load

    try:
        return load(bytes(data))
    except Exception as error:  # safetensors' own error type for a file that is not one
        raise CheckpointError(f"{file} is not a safetensors file: {error}") from None


_LIBRARY_DTYPES = ("C64", "U16", "U32", "U64", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0", "F4")


def file_record(file: Path, algorithm: str | None = None) -> dict[str, Any]:
    """The manifest record of an existing file (DCP's shards, which DCP writes), by reading it."""
    algorithm = algorithm or default_hash()
    digest = new_hash(algorithm)
    size = 0
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
            size += len(block)
    return {"size": size, algorithm: digest.hexdigest()}


def in_parallel(function, arguments: list, keys: list) -> dict:
    """{key: function(argument)}, computed on a few threads.

    Reading, hashing and fsync release the GIL, so the files of a checkpoint are read and hashed
    side by side.
    """
    if len(arguments) <= 1:
        return {key: function(argument) for key, argument in zip(keys, arguments)}
    with ThreadPoolExecutor(max_workers=min(len(arguments), os.cpu_count() or 1)) as pool:
        return dict(zip(keys, pool.map(function, arguments)))
