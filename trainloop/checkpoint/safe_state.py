"""What a callback's `state_dict` may hold: only what `torch.load(weights_only=True)` loads.

`callbacks.pt` is written with `torch.save`, which pickles anything, and read with
`weights_only=True`, which loads only plain data. A NumPy scalar in a callback's state (a best
metric from `numpy.mean`) would save without complaint and make every later resume refuse the
checkpoint. So the states are checked before anything is written, and the error names the
callback and the key, and what to store instead.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from trainloop.errors import CheckpointError

if TYPE_CHECKING:
    from trainloop.state import RunState

# What the weights_only unpickler of torch 2.10+ loads without being told of more
# (tests/test_checkpoint_contract.py round-trips each).
_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.device, torch.dtype, torch.Size)
_CONTAINERS = (dict, OrderedDict, list, tuple, set)


def check_callback_states(state: RunState) -> None:
    """CheckpointError if a callback's `state_dict()` holds what a safe load refuses."""
    for callback in state.callbacks:
        where = _refused(callback.state_dict())
        if where is not None:
            path, value = where
            raise CheckpointError(
                f"cannot checkpoint callback {callback.key!r}: its state_dict(){path} is a "
                f"{type(value).__module__}.{type(value).__qualname__}, which torch.load(weights_only=True) "
                "refuses, so no resume could load the checkpoint. Store tensors, numbers, strings, "
                "bytes, None, or dicts, lists, tuples and sets of them (float(x) or x.item() for a "
                "NumPy scalar, torch.from_numpy(a) for an array)"
            )


def extra_states(extra: Mapping[str, Any] | None, filter: Mapping[str, Callable] | None) -> dict[str, Any]:
    """The states of `tl.save`'s `extra` objects, by name: `state_dict()` of an object that has
    one, else the value itself; each `filter[name](key, value)` keeps the entries of a state
    dict it returns True for. CheckpointError for what a safe load refuses; ValueError for a
    filter of no saved thing."""
    extra, filter = dict(extra or {}), dict(filter or {})
    unknown = sorted(set(filter) - {"model", *extra})
    if unknown:
        raise ValueError(f"save filter= names {unknown[0]!r}, which is neither 'model' nor a name in extra= "
                         f"({', '.join(map(repr, extra)) or 'none given'})")
    states = {}
    for name, obj in extra.items():
        if not isinstance(name, str):
            raise ValueError(f"save extra= names must be strings (got {name!r})")
        value = obj.state_dict() if callable(getattr(obj, "state_dict", None)) else obj
        if name in filter:
            if not isinstance(value, dict):
                raise ValueError(f"save filter={name!r}: extra {name!r} is not a state dict to filter")
            value = {k: v for k, v in value.items() if filter[name](k, v)}
        where = _refused(value)
        if where is not None:
            path, refused = where
            raise CheckpointError(
                f"cannot checkpoint extra {name!r}: {name}{path} is a {type(refused).__module__}."
                f"{type(refused).__qualname__}, which torch.load(weights_only=True) refuses: store tensors, "
                "numbers, strings, bytes, None, or dicts, lists, tuples and sets of them (never code)"
            )
        states[name] = value
    return states


def _refused(obj: Any, path: str = "") -> tuple[str, Any] | None:
    """(where, value) of the first value in `obj` a safe load refuses, or None."""
    if isinstance(obj, torch.Tensor):
        return None
    kind = type(obj)
    if kind in _LEAVES:
        return None
    if kind not in _CONTAINERS:
        return path, obj
    if kind in (dict, OrderedDict):
        for key, value in obj.items():
            if type(key) not in _LEAVES:
                return f"{path} (a key)", key
            found = _refused(value, f"{path}[{key!r}]")
            if found is not None:
                return found
        return None
    for index, value in enumerate(obj):
        found = _refused(value, f"{path}[{index}]")
        if found is not None:
            return found
    return None
