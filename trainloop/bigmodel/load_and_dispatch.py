"""`load_and_dispatch`: build on meta, place and load in one call (Accelerate's `load_checkpoint_and_dispatch`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from trainloop.bigmodel.checkpoint_reader import Checkpoint
from trainloop.bigmodel.dispatch import dispatch
from trainloop.bigmodel.key_map import KeyMap
from trainloop.bigmodel.placement import device_map as place
from trainloop.models.meta import empty_weights


def load_and_dispatch(model: nn.Module | Callable[[], nn.Module], checkpoint: Checkpoint,
                      device_map: Mapping[str, str | int] | str = "auto", *,
                      max_memory: Mapping[str | int, int | str] | str = "auto",
                      no_split: Iterable[type[nn.Module] | str] | None = None,
                      dtype: torch.dtype | None = None, offload_dir: str | os.PathLike | None = None,
                      key_map: KeyMap | None = None) -> nn.Module:
    """Build the model without memory, place it and load its checkpoint; returns it ready for inference.

    `model` is a module (already built, usually under `empty_weights()`) or a function that
    builds one (`lambda: LlamaForCausalLM(config)`), which is called under `empty_weights()`.
    `device_map` is a map as `dispatch` takes it, one device for the whole model (`"cpu"`,
    `"cuda:0"`), or `"auto"`: `device_map(model, max_memory, no_split, dtype)`, where
    `no_split=None` takes the model's own `_no_split_modules`. The rest goes to `dispatch`:
    `dtype` casts floating-point weights as they load, `offload_dir` holds "disk" weights of a
    checkpoint that is not safetensors, `key_map` renames checkpoint keys (the base-model
    prefix of a Hugging Face model is handled by itself).

    Equivalent to::

        with empty_weights():
            model = build()
        placement = device_map(model, max_memory=max_memory, no_split=no_split, dtype=dtype)
        model = dispatch(model, checkpoint, placement, offload_dir=offload_dir, dtype=dtype, key_map=key_map)

    Raises what those raise, and TypeError for a `model` that is neither a module nor a
    function returning one.
    """
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise TypeError(f"model must be an nn.Module or a function that builds one (got {type(model).__name__})")
        build = model
        with empty_weights():
            model = build()
        if not isinstance(model, nn.Module):
            raise TypeError(f"the function passed as model returned a {type(model).__name__}, not an nn.Module")
    if isinstance(device_map, str) and device_map == "auto":
        placement: Mapping[str, str | int] = place(model, max_memory=max_memory, no_split=no_split, dtype=dtype)
    elif isinstance(device_map, (str, int, torch.device)):
        placement = {"": device_map if isinstance(device_map, int) else str(device_map)}
    else:
        placement = device_map
    return dispatch(model, checkpoint, placement, offload_dir=offload_dir, dtype=dtype, key_map=key_map)
