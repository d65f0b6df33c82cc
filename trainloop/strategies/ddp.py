"""DistributedDataParallel: a whole replica of the model per rank, gradients all-reduced.

DDP's constructor broadcasts rank 0's parameters and buffers, so every rank starts from the same
model however it was built. Its own options are the record `DDPOptions` (`config.ddp`; the
settings `ddp_*`): `find_unused_parameters`, `static_graph`, `gradient_as_bucket_view`,
`bucket_cap_mb`, and a gradient-compression communication hook (`ddp_comm_hook="bf16"|"fp16"`,
torch's `default_hooks`). The traps each one carries are in their help and in docs/fsdp.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
from torch import nn

from trainloop import forwarding
from trainloop.errors import SettingError
from trainloop.forwarding import unwrap, wrapper_layers
from trainloop.models.meta import materialize
from trainloop.settings import Settings, at_least, boolean, is_boolean, number, one_of, setting, text, to_float
from trainloop.strategies import blocks
from trainloop.strategies.base import WholeModel, refuse_mesh

if TYPE_CHECKING:
    from trainloop.config import Config
    from trainloop.topology import Topology

DDP = nn.parallel.DistributedDataParallel
_NOTHING_TO_DO = contextlib.nullcontext()


@attrs.frozen
class DDPOptions(Settings):
    """DistributedDataParallel's own options: the settings `ddp_<field>`."""

    prefix = "ddp_"

    find_unused_parameters: bool = setting(
        False, parse=boolean, check=[is_boolean],
        help="DDP: let backward finish when some parameters got no gradient this step. Trap: a "
             "parameter used on only some ranks is averaged with zeros from the others (a gradient "
             "of 1.0 becomes 0.5 on 2 ranks); costs a graph walk per backward")
    static_graph: bool = setting(
        False, parse=boolean, check=[is_boolean],
        help="DDP: the set of used parameters and the graph never change between steps (allows "
             "reentrant activation checkpointing). Traps: a model whose control flow does change "
             "gets wrong or missing gradient syncs; torch's DDP breaks with it under no_sync, so it "
             "is refused with accumulate > 1")
    gradient_as_bucket_view: bool = setting(
        False, parse=boolean, check=[is_boolean],
        help="DDP: gradients are views into the all-reduce buckets (saves one copy of the "
             "gradients). Trap: code that calls grad.detach_() or replaces a view in place fails or "
             "writes into the bucket")
    bucket_cap_mb: float = setting(
        25.0, parse=number, convert=to_float, check=[at_least(0.001)],
        help="DDP: megabytes of gradients per all-reduce bucket (25: torch's default, with a small "
             "first bucket). Trap: tiny buckets mean many small collectives, huge ones no overlap "
             "of the all-reduce with backward")
    comm_hook: str = setting(
        "none", parse=text, check=[one_of(("none", "bf16", "fp16"))],
        help="DDP: all-reduce gradients compressed to bf16 or fp16 (torch's default_hooks; bf16 "
             "needs nccl). Traps: the sum is rounded, so training is no longer exact; fp16 "
             "overflows for gradients above 65504 x world_size")


class DataParallel(WholeModel):
    """The strategy of `strategy="auto"` or `"ddp"` on more than one process."""

    name = "ddp"

    def __init__(self, config: Config, topology: Topology):
        options = config.ddp
        if options.comm_hook == "bf16" and topology.backend not in ("nccl", "xccl"):
            raise SettingError(
                "ddp_comm_hook",
                f"ddp_comm_hook='bf16' needs the nccl or xccl backend (torch's bf16_compress_hook), "
                f"and this run uses {topology.backend}: use ddp_comm_hook='fp16' or 'none'"
            )
        if options.static_graph and config.accumulate > 1:
            # torch's DDP asserts inside no_sync with static_graph, and once past that stops
            # all-reducing from the second window on (pytorch#143580, accelerate#3679).
            raise SettingError(
                "ddp_static_graph",
                f"ddp_static_graph=True does not work with accumulate={config.accumulate}: torch's "
                "DDP breaks inside no_sync with a static graph (pytorch/pytorch#143580). Use "
                "accumulate=1, or leave ddp_static_graph off"
            )
        refuse_mesh(config, "ddp")
        super().__init__(config, topology)
        self.options: dict[str, Any] = {
            "find_unused_parameters": options.find_unused_parameters,
            "static_graph": options.static_graph,
            "gradient_as_bucket_view": options.gradient_as_bucket_view,
            # 25 is torch's default: passed as None, DDP keeps its small (1 MiB) first bucket.
            "bucket_cap_mb": None if options.bucket_cap_mb == 25.0 else options.bucket_cap_mb,
        }
        self.comm_hook = options.comm_hook
        self._owners: dict[nn.Module, DDP | None] = {}  # prepared model -> its DDP layer (no_sync)

    def wrap(self, model: nn.Module) -> tuple[nn.Module, dict[int, nn.Parameter]]:
        blocks.apply(unwrap(model), self._config)
        replaced = materialize(model, self._device, self._config.seed)  # built under tl.empty_weights()
        device_ids = [self._device.index] if self._device.type != "cpu" else None
        # The constructor broadcasts rank 0's parameters and buffers to every rank; the subclass
        # only adds reading the user's attributes through it (trainloop.forwarding).
        wrapped = forwarding.DistributedDataParallel(model, device_ids=device_ids, **self.options)
        if self.comm_hook != "none":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            hook = {"bf16": default_hooks.bf16_compress_hook, "fp16": default_hooks.fp16_compress_hook}
            wrapped.register_comm_hook(None, hook[self.comm_hook])  # None: the default process group
        return wrapped, replaced

    def no_sync(self, models: Sequence[nn.Module]) -> contextlib.AbstractContextManager:
        if len(models) == 1:  # the common case: DDP's own context manager, nothing around it
            model = models[0]
            # Every micro-step off a window's end comes here: the DDP layer of each prepared model
            # is found once (a walk, and isinstance on DDP's class, an ABC, is a Python call), then
            # looked up. A prepared model's layers never change.
            if model in self._owners:
                owner = self._owners[model]
            else:
                owner = self._owners[model] = _ddp_layer(model)
            return _NOTHING_TO_DO if owner is None else owner.no_sync()
        return _all_no_sync(models)

    def __repr__(self) -> str:
        return f"DataParallel({self.options}, comm_hook={self.comm_hook!r})"


def _ddp_layer(model: nn.Module) -> DDP | None:
    """The DistributedDataParallel among the layers `prepare` wrapped the model in, if any."""
    for layer in wrapper_layers(model):
        if isinstance(layer, DDP):
            return layer
    return None


@contextlib.contextmanager
def _all_no_sync(models: Sequence[nn.Module]):
    with contextlib.ExitStack() as stack:
        for model in models:
            owner = _ddp_layer(model)
            if owner is not None:
                stack.enter_context(owner.no_sync())
        yield
