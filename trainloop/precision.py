"""Precision policies: what `init(precision=...)` does to a prepared model.

| policy      | parameters | forward                          | loss scaling          |
| ----------- | ---------- | -------------------------------- | --------------------- |
| `fp32`      | fp32       | fp32                             | none                  |
| `bf16`      | fp32       | autocast to bf16                 | none                  |
| `fp16`      | fp32       | autocast to fp16                 | `LossScale` (dynamic) |
| `bf16-true` | bf16       | bf16 (no autocast)               | none                  |
| `fp8`       | fp32       | torchao float8 Linear layers, bf16 autocast around the rest | none |

Under autocast, a prepared model's outputs come out in the autocast dtype for the ops autocast
lowers (matmuls, convolutions) and in fp32 for the ops it keeps in fp32 (softmax, losses):
cast outputs with `.float()` where fp32 matters to you.

Autocast is applied by wrapping the prepared model in `Autocast`, a one-line module around the
forward; the user's class and instance are never patched. `tl.unwrap(model)` returns the
user's module.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


class Autocast(nn.Module):
    """Runs the wrapped module's forward under `torch.autocast(device_type, dtype)`."""

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.module = module
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.module(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"device_type={self.device_type!r}, dtype={self.dtype}"


def cast_module(model: nn.Module, precision: str) -> nn.Module:
    """Set the parameters' dtype for the policy (only `bf16-true` changes it)."""
    if precision in ("fp16", "bf16", "fp8"):
        half = next((p.dtype for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)), None)
        if half is not None:
            raise ValueError(
                f"precision={precision!r} expects fp32 parameters (autocast computes in low "
                f"precision and the optimizer updates fp32 master weights), but the model has "
                f"{half} parameters: build the model in fp32, or use precision='bf16-true' for "
                "parameters in bf16"
            )
    if precision == "bf16-true":
        return model.to(torch.bfloat16)
    return model


def wrap_forward(model: nn.Module, device: torch.device, precision: str) -> nn.Module:
    """Wrap the model so its forward runs under the policy's autocast, if it has one."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return model
    return Autocast(model, device.type, dtype)
