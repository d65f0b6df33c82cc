"""What `tl.export` knows of the model: which tensors it writes, under which names, how each is gathered.

- `plan`: the model's state-dict tensors as the exported file names them: a tied weight once
  (Hugging Face's way: `lm_head.weight` is left out when it is `embed_tokens.weight`), each name
  passed through `key_map`, each floating tensor in the export's dtype. Shapes and dtypes only:
  nothing is gathered, and every rank plans the same, so the ranks meet in the same collectives.
- `shard_groups`: the tensors split into files of at most `max_shard_size` bytes, in state-dict
  order, as `save_pretrained` splits them (a tensor larger than the limit gets a file of its own).
- `gather`: one tensor whole (a sharded DTensor's `full_tensor`, cast before it travels), so the
  exporting rank holds one tensor at a time, never the model.
- `save_config`: `config.json` (and `generation_config.json`) of a Hugging Face model, so the
  directory loads with `from_pretrained` as it is.

`key_map` renames the run's names (`layers.0.attention.wq.weight`) to the file's
(`model.layers.0.self_attn.q_proj.weight`): a callable `name -> new name` (None leaves the tensor
out), or a dict in the form of torchtitan's state-dict adapters' `to_hf_map`: exact names, or
names with `{}` where the run's name has a number (a layer index), the number put back where the
replacement has `{}`; a None value leaves the tensor out. A name the dict does not cover, and two
names renamed to one, raise ValueError naming them: a file with names its loader does not know
would load as random weights.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
from torch import nn

ExportKeyMap = Callable[[str], "str | None"] | Mapping[str, "str | None"]
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_NUMBER = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)")  # a whole dotted component that is a number


class Planned(NamedTuple):
    """One tensor of the export: its name in the file, its name in the model, its dtype and shape there."""

    name: str
    source: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * _numel(self.shape)


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or a string as `save_pretrained`'s `max_shard_size` ("5GB", "500MiB")."""
    if isinstance(size, int) and not isinstance(size, bool):
        number = size
    elif isinstance(size, str) and (match := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", size.upper())):
        number = int(float(match[1]) * _UNITS[match[2] if match[2] in _UNITS else match[2] + "B"])
    else:
        raise ValueError(f"max_shard_size must be a number of bytes or a size such as '5GB' or '500MiB' "
                         f"(got {size!r})")
    if number <= 0:
        raise ValueError(f"max_shard_size must be > 0 (got {size!r})")
    return number


def plan(module: nn.Module, dtype: torch.dtype | None, key_map: ExportKeyMap | None) -> tuple[
        list[Planned], dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to write (in state-dict order), the model's tensors by name, and each tied name
    left out -> the name kept for it. Raises ValueError (a non-tensor entry, a bad `key_map`)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.bfloat16 (got {dtype!r}): "
                         "it casts the floating tensors; integer tensors keep their dtype")
    state_dict = module.state_dict()
    others = sorted(name for name, value in state_dict.items() if not isinstance(value, torch.Tensor))
    if others:
        raise ValueError(f"export writes tensors only, and the model's state dict holds {', '.join(others)} "
                         "(extra state, not tensors): save it apart, or export a model without it")
    tied = _tied(module, list(state_dict))
    rename = _renamer(key_map)
    planned, by_name = [], {}
    for source, tensor in state_dict.items():
        if source in tied:
            continue
        name = rename(source)
        if name is None:
            continue
        if not isinstance(name, str) or not name:
            raise ValueError(f"key_map({source!r}) returned {name!r}: return the file's name for the tensor, or "
                             "None to leave it out")
        if name in by_name:
            raise ValueError(f"key_map renames two tensors to {name!r}: {by_name[name]!r} and {source!r}")
        by_name[name] = source
        out = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        planned.append(Planned(name, source, out, tuple(tensor.shape)))
    unmapped = getattr(rename, "unmapped", [])
    if unmapped:
        raise ValueError(f"key_map has no name for {len(unmapped)} tensor(s): {', '.join(unmapped[:8])}"
                         f"{', ...' if len(unmapped) > 8 else ''}. Add them to the dict (a None value leaves "
                         "a tensor out), or pass a callable")
    return planned, state_dict, tied


def shard_groups(planned: list[Planned], max_bytes: int) -> list[list[Planned]]:
    """`planned` cut into files of at most `max_bytes` (one larger tensor alone), in order."""
    groups: list[list[Planned]] = []
    size = 0
    for tensor in planned:
        if not groups or (size + tensor.nbytes > max_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    return groups or [[]]


def gather(tensor: torch.Tensor, dtype: torch.dtype, wanted: bool = True) -> torch.Tensor | None:
    """`tensor` whole, in `dtype` (None where not `wanted`, once any collective is done).

    Collective for a DTensor: every rank of its mesh calls it, wanted or not.
    """
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        # Cast the local shard first: what travels, and what arrives, is in the export's dtype.
        sharded = cast(DTensor, tensor.to(dtype))
        if sharded.device.type != sharded.device_mesh.device_type:  # CPU-offloaded shards of a CUDA mesh
            sharded = cast(DTensor, sharded.to(sharded.device_mesh.device_type))
        whole = sharded.full_tensor()
        return whole if wanted else None
    return tensor.to(dtype) if wanted else None


def release_freed(nbytes: int) -> None:
    """Hand the memory of a freed tensor of `nbytes` back to the system (glibc's `malloc_trim`).

    glibc keeps freed blocks of a few MiB in its heaps (its mmap threshold rises to the largest
    block freed), so gathering tensor after tensor would grow the process by many tensors' worth
    (44 MiB for 16 tensors of 4 MiB, measured) though it holds one at a time. Skipped for small
    tensors (the trim walks the heaps) and where the C library has no `malloc_trim`.
    """
    if nbytes >= 2**20 and (trim := _malloc_trim()) is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def save_config(module: nn.Module, directory: Path, dtype: torch.dtype | None) -> list[str]:
    """Write a Hugging Face model's config (and generation config) into `directory`; the file names."""
    written = []
    config: Any = getattr(module, "config", None)
    if callable(getattr(config, "save_pretrained", None)) and callable(getattr(config, "to_dict", None)):
        if dtype is not None:  # the config says what the files hold: from_pretrained(dtype="auto") reads it
            config = copy.deepcopy(config)
            config.dtype = dtype
        config.save_pretrained(directory)
        written.append("config.json")
    generation: Any = getattr(module, "generation_config", None)
    if callable(getattr(generation, "save_pretrained", None)):
        generation.save_pretrained(directory)
        written.append("generation_config.json")
    return [name for name in written if (directory / name).is_file()]


def _tied(module: nn.Module, names: list[str]) -> dict[str, str]:
    """Each name of the state dict that is another's tensor (tied weights) -> the name kept for it.

    Found from the parameter objects, the same on every rank (a shard's storage is not: an empty
    one has no address). The first name in state-dict order is kept, unless the model declares it
    a tied copy (Hugging Face's `_tied_weights_keys`: `lm_head.weight`) and another name is not.
    """
    in_state = set(names)
    groups: dict[int, list[str]] = {}
    for name, tensor in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        if name in in_state:
            groups.setdefault(id(tensor), []).append(name)
    declared = getattr(module, "_tied_weights_keys", None) or ()
    copies = set(declared) if isinstance(declared, (Mapping, list, tuple, set)) else set()
    order = {name: index for index, name in enumerate(names)}
    left: dict[str, str] = {}
    for group in groups.values():
        if len(group) < 2:
            continue
        group.sort(key=lambda name: (name in copies, order[name]))
        left.update(dict.fromkeys(group[1:], group[0]))
    return left


def _renamer(key_map: ExportKeyMap | None) -> Callable[[str], str | None]:
    if key_map is None:
        return lambda name: name
    if isinstance(key_map, Mapping):
        return _DictRenamer(key_map)
    if callable(key_map):
        return key_map
    raise TypeError(f"key_map must be a callable (the run's name -> the file's name) or a dict of names "
                    f"(got {type(key_map).__name__})")


class _DictRenamer:
    """torchtitan's `to_hf_map` lookup: the exact name, else the name with its numbers as `{}`."""

    def __init__(self, key_map: Mapping[str, str | None]) -> None:
        bad = [key for key, value in key_map.items() if not isinstance(key, str) or not (value is None or isinstance(value, str))]
        if bad:
            raise TypeError(f"key_map must map names (strings) to names or None (got {bad[0]!r})")
        self.key_map = key_map
        self.unmapped: list[str] = []

    def __call__(self, name: str) -> str | None:
        if name in self.key_map:
            return self.key_map[name]
        numbers = _NUMBER.findall(name)
        abstract = _NUMBER.sub("{}", name)
        if numbers and abstract in self.key_map:
            target = self.key_map[abstract]
            if target is None:
                return None
            if target.count("{}") != len(numbers):
                raise ValueError(f"key_map[{abstract!r}] = {target!r} needs one '{{}}' per number of {name!r} "
                                 f"({len(numbers)})")
            return target.format(*numbers)
        self.unmapped.append(name)
        return None


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
