"""`KeptLoader`: a DataLoader that `prepare(..., shard=False)` keeps as the user built it.

For a loader already sharded (a `DistributedSampler`, a dataset that reads this rank's files) or
a DataLoader subclass with its own iteration: trainloop neither re-builds nor re-shards it. It
still moves batches to the device (unless `move_to_device=False`), calls `set_epoch(epoch)` on
the sampler (and the batch sampler, and the sampler inside it) before each epoch, closes the
accumulation window at an epoch's last batch, and keeps its position for checkpoints: the epoch
and the batches of it already yielded. Resuming mid-epoch re-reads and drops those batches (its
sampler must give the same order again for the same epoch, as `DistributedSampler` does).

What it cannot know: which rows the user's sharding repeated to even out the ranks, so
`gather(..., loader=)` refuses it (gather without `loader=` keeps every row).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from trainloop.data.loader import PreparedLoader, _move


class KeptLoader(PreparedLoader):
    """The user's loader, iterated as it is (see the module doc)."""

    def __init__(self, loader: DataLoader, *, device: torch.device, move_to_device: bool = True):
        # PreparedLoader's own __init__ re-builds the loader: this one keeps it, so it sets the
        # fields that the shared methods and the checkpoint code read.
        self.original = loader
        self.device = device
        self.world_size = 1  # the loader's own sharding: positions count this rank's batches
        self.even_batches = True
        self.epoch = 0
        self.samples_seen = 0
        self._position = 0  # this epoch's batches already yielded, on this rank
        self.at_last_batch = False
        self._yielded_epoch, self._batch_rows, self._batch_padding, self._epoch_rows = None, 0, 0, 0
        self._move = move_to_device and device.type != "cpu"
        self._non_blocking = bool(getattr(loader, "pin_memory", False))
        self._plan = self._stream = None
        self.batch_size = getattr(loader, "batch_size", None)

    def padding_rows(self, num_rows: int) -> int | None:
        return None  # the user's sharding may have repeated rows: no way to tell which

    def describe_rows(self) -> str:
        return ("no rows it can match: it was prepared with shard=False, so which rows its own "
                "sampler repeated is unknown")

    def __len__(self) -> int:
        return len(self.original)

    def _set_epoch(self) -> None:
        batch_sampler = getattr(self.original, "batch_sampler", None)
        for sampler in (getattr(self.original, "sampler", None), batch_sampler,
                        getattr(batch_sampler, "sampler", None)):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)

    def __iter__(self) -> Iterator[Any]:
        self._set_epoch()
        skip = self._position
        try:
            known = len(self.original)
        except TypeError:  # an IterableDataset without a length
            known = None
        iterator = iter(self.original)
        for _ in range(skip):  # resumed mid-epoch: the batches already trained on
            next(iterator, None)
        pending = next(iterator, None) if known is None else None
        index = skip
        try:
            while True:
                if known is None:  # hold one batch back to know which one is the last
                    if pending is None:
                        break
                    batch, pending = pending, next(iterator, None)
                    last = pending is None
                else:
                    if index >= known:
                        break
                    batch = next(iterator)
                    last = index + 1 == known
                index += 1
                self._position = index
                self.at_last_batch = last
                yield _move(batch, self.device, self._non_blocking) if self._move else batch
        finally:
            self.at_last_batch = False
        self.epoch, self._position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int | None]:
        """The epoch and this rank's batches of it already yielded."""
        return {"epoch": self.epoch, "samples_seen": 0, "batches_seen": self._position,
                "world_size": None, "batch_size": self.batch_size, "kept": 1}

    def check_state_dict(self, state_dict: dict[str, int | None]) -> None:
        if "kept" not in state_dict:
            raise ValueError(
                "this loader position is of a loader that prepare sharded, and the loader being "
                "restored was prepared with shard=False: prepare it the way the checkpoint's run did"
            )

    def load_state_dict(self, state_dict: dict[str, int | None]) -> None:
        self.check_state_dict(state_dict)
        self.epoch, self._position = int(state_dict["epoch"]), int(state_dict["batches_seen"])

    def __repr__(self) -> str:
        return f"KeptLoader(epoch={self.epoch}, batches={len(self)}, device='{self.device}')"
