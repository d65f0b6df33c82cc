"""The walk through the layers `prepare` wraps a model in: autocast, the strategy's, compile.

`prepare` returns the user's module inside a few wrappers, outermost first: autocast around the
forward (`precision.Autocast`), DistributedDataParallel (DDP runs), torch.compile's
`OptimizedModule` (`compile=True`). FSDP2 and tensor parallelism shard the user's module in
place and add no layer. Everything that must reach the user's own module, or one particular
layer, walks the same chain here.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from trainloop import precision


def wrapper_layers(model: nn.Module) -> Iterator[nn.Module]:
    """`model`, then each module it wraps (DDP, autocast, compile), outermost first."""
    while True:
        yield model
        if isinstance(model, (nn.parallel.DistributedDataParallel, precision.Autocast)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return


def unwrap(model: nn.Module) -> nn.Module:
    """The user's own module inside what `prepare` returned (DDP, autocast, compile wrappers)."""
    *_, innermost = wrapper_layers(model)
    return innermost
