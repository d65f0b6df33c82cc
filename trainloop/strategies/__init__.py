"""How models are spread over processes: one module per strategy, behind one protocol.

`create(config, topology)` picks the strategy for the settings once, in `init`; the run keeps
it as `state.strategy`. The core (prepare, accumulate, the checkpoints, the callbacks) calls
it only through `trainloop.strategies.base.Strategy`.

- `local.Local`: one process (`strategy="auto"` or `"ddp"`): the model as it is.
- `ddp.DataParallel`: DistributedDataParallel (`"auto"` or `"ddp"` on many processes).
- `fsdp.FullyShard`: FSDP2 `fully_shard` (`"fsdp"`, any number of processes). Imported only
  for FSDP runs: torch.distributed.fsdp costs about half a second to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainloop.strategies.base import Strategy

if TYPE_CHECKING:
    from trainloop.config import Config
    from trainloop.topology import Topology

__all__ = ["Strategy", "create"]


def create(config: Config, topology: Topology) -> Strategy:
    """The strategy for `config.strategy` on this topology; raises ValueError for settings it refuses.

    Nothing else is needed to build or use one: `create(tl.Config(), tl.Topology()).wrap(model)`
    works without a run (tests build strategies that way).
    """
    if config.strategy == "fsdp":
        from trainloop.strategies.fsdp import FullyShard

        return FullyShard(config, topology)
    if topology.world_size > 1:  # "auto" and "ddp"
        from trainloop.strategies.ddp import DataParallel

        return DataParallel(config, topology)
    from trainloop.strategies.local import Local

    return Local(config, topology)
