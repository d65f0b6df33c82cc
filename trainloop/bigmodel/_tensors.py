"""A model's tensors under all their names (tied weights are one), and loading them from a checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from trainloop.bigmodel._devices import _target_dtype
from trainloop.bigmodel.checkpoint_reader import _MappingCheckpoint, _SafetensorsCheckpoint


@dataclass(eq=False)
class _ModelTensor:
    """One tensor of a model under every name it has: tied weights are one _ModelTensor."""

    names: list[str]
    places: list[tuple[dict, str]]  # the modules' `_parameters`/`_buffers` dicts holding it, and keys
    is_parameter: bool
    requires_grad: bool
    initial: torch.Tensor | None = None  # a buffer's real value, kept if the checkpoint lacks it
    key: str | None = None  # its key in the checkpoint
    home: str = "cpu"  # where it lives between forwards: an accelerator, "cpu" or "disk"
    disk: tuple[Path, str] | None = None  # (safetensors file, key) of a "disk" tensor
    aliases: list[str] = field(default_factory=list)  # other names it may have in the checkpoint

    @property
    def value(self) -> torch.Tensor:
        store, attr = self.places[0]
        return store[attr]

    def set(self, value: torch.Tensor) -> None:
        """Make every place hold `value` (the same object: tied names stay tied)."""
        for store, attr in self.places:
            store[attr] = value

    def put(self, data: torch.Tensor) -> None:
        """Make every place hold `data`, as a Parameter where the model has a parameter."""
        self.set(nn.Parameter(data, requires_grad=self.requires_grad) if self.is_parameter else data)


def _model_tensors(model: nn.Module) -> list[_ModelTensor]:
    found: dict[int, _ModelTensor] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for store, is_parameter in ((module._parameters, True), (module._buffers, False)):
            for attr, tensor in store.items():
                if tensor is None:
                    continue
                entry = found.get(id(tensor))
                if entry is None:
                    # Only buffers keep their initial value: holding a real parameter here
                    # would keep the model's old weights alive as long as the hooks.
                    initial = None if is_parameter or tensor.is_meta else tensor
                    entry = found[id(tensor)] = _ModelTensor(names=[], places=[], is_parameter=is_parameter,
                                                             requires_grad=tensor.requires_grad, initial=initial)
                entry.names.append(f"{module_name}.{attr}" if module_name else attr)
                entry.places.append((store, attr))
    return list(found.values())


def _find_keys(tensors: list[_ModelTensor], checkpoint: _SafetensorsCheckpoint | _MappingCheckpoint,
               names: Mapping[str, str] | None = None) -> None:
    """Find each tensor's checkpoint key, under any of its names; check that every one is there.

    `names` maps the model's names to checkpoint keys (`key_map.model_names`); by default each
    key is the name. A parameter must be in the checkpoint. A buffer that is not keeps the real
    value it was built with (non-persistent buffers are never saved); a buffer on the meta
    device has none.
    """
    if names is None:
        names = {key: key for key in checkpoint.shapes}
    missing, missing_buffers, mismatched = [], False, []
    for tensor in tensors:
        tensor.key = next((names[name] for name in (*tensor.names, *tensor.aliases) if name in names), None)
        if tensor.key is None:
            if tensor.is_parameter or tensor.initial is None:
                missing.append(tensor.names[0])
                missing_buffers |= not tensor.is_parameter
        elif checkpoint.shapes[tensor.key] != tuple(tensor.value.shape):
            mismatched.append(f"{tensor.key} {list(checkpoint.shapes[tensor.key])} vs {list(tensor.value.shape)}")
    if missing:
        buffer_hint = (" Buffers that checkpoints do not save must be built real: "
                       "use empty_weights(include_buffers=False).") if missing_buffers else ""
        raise ValueError(
            f"the checkpoint is missing {len(missing)} of the model's tensors: {_first_few(missing)}. "
            f"Is it this model's checkpoint? Its keys look like {_first_few(sorted(checkpoint.shapes), 3)}: "
            "if only the names differ, pass key_map= to rename them (a callable, or regular expressions "
            f"such as {{r'^': 'model.'}}).{buffer_hint}")
    if mismatched:
        raise ValueError(f"checkpoint shapes differ from the model's (checkpoint vs model): {_first_few(mismatched)}")


def _first_few(items: list[str], count: int = 5) -> str:
    more = f" and {len(items) - count} more" if len(items) > count else ""
    return ", ".join(items[:count]) + more


def _load(tensors: list[_ModelTensor], checkpoint: _SafetensorsCheckpoint | _MappingCheckpoint,
          device: str | torch.device, dtype: torch.dtype | None) -> None:
    """Give each tensor its real value on `device`: from the checkpoint, else its initial value."""
    by_key: dict[str, list[_ModelTensor]] = {}
    for tensor in tensors:
        if tensor.key is not None:
            by_key.setdefault(tensor.key, []).append(tensor)
        else:
            tensor.put(tensor.initial.to(device))
    for key, data in checkpoint.read(list(by_key)):
        for tensor in by_key[key]:
            # copy=True even when device and dtype match: a view would keep the whole file mapped.
            tensor.put(data.to(device=device, dtype=_target_dtype(tensor.value, dtype), copy=True))
