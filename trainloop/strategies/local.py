"""One process: the model is used as it is; there is nothing to synchronise."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn

from trainloop.forwarding import unwrap
from trainloop.models.meta import materialize
from trainloop.strategies import blocks
from trainloop.strategies.base import WholeModel, refuse_mesh

if TYPE_CHECKING:
    from trainloop.config import Config
    from trainloop.topology import Topology

_NOTHING_TO_DO = contextlib.nullcontext()


class Local(WholeModel):
    """The strategy of a single process with `strategy="auto"` or `"ddp"`."""

    name = "local"

    def __init__(self, config: Config, topology: Topology):
        refuse_mesh(config, config.strategy)
        super().__init__(config, topology)

    def wrap(self, model: nn.Module) -> tuple[nn.Module, dict[int, nn.Parameter]]:
        blocks.apply(unwrap(model), self._config)
        return model, materialize(model, self._device, self._config.seed)  # built under tl.empty_weights()

    def no_sync(self, models: Sequence[nn.Module]) -> contextlib.AbstractContextManager:
        return _NOTHING_TO_DO
