"""Prepared data loaders: sharded across ranks, seeded shuffling, batches on the device, resumable.

How a map-style dataset is cut up, every epoch:

1. The epoch's *order* of sample indices: a permutation from a generator seeded `seed + epoch`
   when the user's loader shuffled, `0..n-1` when it did not, or what the user's own sampler
   draws under the same seed. Every rank computes the same order.
2. The order is read in *global batches* of `batch_size * world_size` samples; rank r takes the
   r-th contiguous chunk of each. Gathering a batch across ranks therefore gives back the
   global batch in order, and one process with `batch_size * world_size` sees the same batches.
3. A last, partial global batch is split evenly and padded by wrapping around to the start of
   the order, so that every rank gets the same number of batches of the same size (no rank can
   wait in a collective for one that ran out). `gather` drops that padding again.

The position within the epoch is kept as a count of global samples already yielded. Resuming
starts the DataLoader's batch sampler at that offset: the skipped samples are never read. A
different world size on resume re-shards the rest of the epoch from the same offset.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SequentialSampler
from torch.utils.data.sampler import BatchSampler

# DataLoader settings carried over to the re-built loader as they are.
_PASSED_THROUGH = (
    "num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn",
    "multiprocessing_context", "prefetch_factor", "persistent_workers", "pin_memory_device",
    "in_order",
)


def _loader_settings(loader: DataLoader) -> dict[str, Any]:
    settings = {name: getattr(loader, name) for name in _PASSED_THROUGH if hasattr(loader, name)}
    if settings.get("num_workers", 0) == 0:
        # DataLoader refuses these without workers, even at their "unset" values.
        settings.pop("prefetch_factor", None)
        settings.pop("persistent_workers", None)
    return settings


class _EpochPlan:
    """Which indices this rank reads, batch by batch, for a map-style dataset."""

    def __init__(self, loader: DataLoader, *, rank: int, world_size: int, seed: int):
        # DataLoader(batch_size=...) and DataLoader(batch_sampler=BatchSampler(...)) both end up
        # as a plain BatchSampler; its sampler, size and drop_last are all we need.
        batch_sampler = loader.batch_sampler
        if type(batch_sampler) is not BatchSampler:
            raise TypeError(
                "prepare supports DataLoaders built with batch_size= (and optionally shuffle=, "
                f"sampler=, drop_last=); got batch_sampler={type(batch_sampler).__name__}. "
                "Give the batch size to the DataLoader and a per-sample sampler instead."
            )
        self.sampler = batch_sampler.sampler
        self.batch_size = batch_sampler.batch_size
        self.drop_last = batch_sampler.drop_last
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_samples = len(self.sampler)
        # Where the next pass starts; set by the PreparedLoader before each pass.
        self.epoch, self.start = 0, 0
        self.padding = 0  # padding samples in this pass's last global batch

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def num_batches(self, start: int = 0) -> int:
        remaining = self.num_samples - start
        if self.drop_last:
            return remaining // self.global_batch_size
        return math.ceil(remaining / self.global_batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """The global sample order of `epoch`: the same on every rank."""
        if isinstance(self.sampler, SequentialSampler):
            return torch.arange(self.num_samples)
        if isinstance(self.sampler, RandomSampler) and not self.sampler.replacement:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            return torch.randperm(self.num_samples, generator=generator)
        # Any other sampler draws from torch's global RNG: seed it for this epoch alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + epoch)
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(epoch)
            return torch.tensor(list(self.sampler), dtype=torch.long)

    def __len__(self) -> int:
        return self.num_batches(self.start)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order(self.epoch)
        size, rank, world = self.global_batch_size, self.rank, self.world_size
        self.padding = 0
        for begin in range(self.start, self.start + len(self) * size, size):
            chunk = order[begin:begin + size]
            if len(chunk) < size:  # the last, partial global batch: split evenly, pad
                per_rank = math.ceil(len(chunk) / world)
                self.padding = per_rank * world - len(chunk)
                chunk = torch.cat([chunk, order.repeat(math.ceil(self.padding / len(order)) + 1)[:self.padding]])
            else:
                per_rank = self.batch_size
            yield chunk[rank * per_rank:(rank + 1) * per_rank].tolist()


class _ShardedStream(IterableDataset):
    """An IterableDataset read by every rank; rank r keeps its chunk of each global batch.

    Every rank reads the whole stream, so all of them see the same global batches and agree on
    where the stream ends. With DataLoader workers, worker w handles global batches w, w+W, ...
    and the DataLoader's round-robin over workers keeps the order.
    """

    def __init__(self, dataset: IterableDataset, batch_size: int, drop_last: bool,
                 rank: int, world_size: int):
        self.dataset, self.batch_size, self.drop_last = dataset, batch_size, drop_last
        self.rank, self.world_size = rank, world_size
        self.skip_batches = 0
        self.padding = 0

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        size = self.batch_size * self.world_size
        self.padding = 0
        group: list[Any] = []
        index = 0
        for sample in self.dataset:
            group.append(sample)
            if len(group) == size:
                if index >= self.skip_batches and index % num_workers == worker:
                    yield from group[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
                group, index = [], index + 1
        if group and not self.drop_last and index >= self.skip_batches and index % num_workers == worker:
            per_rank = math.ceil(len(group) / self.world_size)
            self.padding = per_rank * self.world_size - len(group)
            group = group + [group[i % len(group)] for i in range(self.padding)]
            yield from group[self.rank * per_rank:(self.rank + 1) * per_rank]


def _move(batch: Any, device: torch.device, non_blocking: bool) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return type(batch)({k: _move(v, device, non_blocking) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_move(v, device, non_blocking) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(v, device, non_blocking) for v in batch)
    return batch


class PreparedLoader:
    """A DataLoader as `prepare` returns it. Iterate it like the original.

    - Batches arrive on the run's device (pytrees of tensors: dicts, lists, tuples, namedtuples).
    - Each rank gets its shard; every rank gets the same number of batches.
    - `epoch` is the epoch the next (or current) pass belongs to; a pass that runs to the end
      advances it. A pass that is broken off continues where it stopped on the next `iter()`.
    - `state_dict()` / `load_state_dict()` save and restore the position: a restored loader
      yields exactly the batches not yet seen, in the same order, without reading the others.
    """

    def __init__(self, loader: DataLoader, *, device: torch.device, rank: int,
                 world_size: int, seed: int):
        if loader.batch_size is None and loader.batch_sampler is None:
            raise TypeError(
                "prepare needs batched DataLoaders: DataLoader(..., batch_size=None) turns "
                "batching off; give it a batch_size"
            )
        self.original = loader
        self.device = device
        self.world_size = world_size
        self.epoch = 0
        self.samples_seen = 0  # global samples of this epoch already yielded, all ranks
        self.at_last_batch = False
        self._move = device.type != "cpu"
        self._non_blocking = bool(loader.pin_memory)
        settings = _loader_settings(loader)
        # The DataLoader draws its workers' base seed from this generator when a pass starts.
        # Without one it would draw from torch's global RNG, so a run resumed mid-epoch would
        # see different dropout than the uninterrupted run. Re-seeded per pass in __iter__.
        self._seed, self._rank = seed, rank
        self._generator = torch.Generator()
        settings["generator"] = self._generator
        if isinstance(loader.dataset, IterableDataset):
            self._stream: _ShardedStream | None = _ShardedStream(
                loader.dataset, loader.batch_size, loader.drop_last, rank, world_size)
            self._plan: _EpochPlan | None = None
            self._loader = DataLoader(self._stream, batch_size=loader.batch_size, **settings)
        else:
            self._stream = None
            self._plan = _EpochPlan(loader, rank=rank, world_size=world_size, seed=seed)
            self._loader = DataLoader(loader.dataset, batch_sampler=self._plan, **settings)
        self.batch_size: int = self._plan.batch_size if self._plan is not None else loader.batch_size

    @property
    def dataset(self):
        return self.original.dataset

    @property
    def padding(self) -> int:
        """Padding samples in the epoch's last global batch (dropped again by `gather`)."""
        source = self._plan if self._plan is not None else self._stream
        return source.padding

    def __len__(self) -> int:
        """Batches per rank in a whole epoch."""
        if self._plan is None:
            return len(self.original) // self.world_size
        return self._plan.num_batches(0)

    def __iter__(self) -> Iterator[Any]:
        if self._epoch_complete(self.samples_seen):
            self.epoch, self.samples_seen = self.epoch + 1, 0
        self._generator.manual_seed(hash((self._seed, self._rank, self.epoch)) & (2**63 - 1))
        global_batch = self.batch_size * self.world_size
        if self._plan is not None:
            self._plan.epoch, self._plan.start = self.epoch, self.samples_seen
            yield from self._iterate_known_length(global_batch)
        else:
            self._stream.skip_batches = self.samples_seen // global_batch
            yield from self._iterate_stream(global_batch)

    def _epoch_complete(self, samples_seen: int) -> bool:
        """Nothing of the epoch is left (a pass was broken off after its last batch)."""
        return self._plan is not None and samples_seen > 0 and self._plan.num_batches(samples_seen) == 0

    def _iterate_known_length(self, global_batch: int) -> Iterator[Any]:
        remaining = len(self._plan)
        try:
            for batch in self._loader:
                remaining -= 1
                self.samples_seen = min(self.samples_seen + global_batch, self._plan.num_samples)
                self.at_last_batch = remaining == 0
                yield _move(batch, self.device, self._non_blocking) if self._move else batch
        finally:
            self.at_last_batch = False
        self.epoch, self.samples_seen = self.epoch + 1, 0

    def _iterate_stream(self, global_batch: int) -> Iterator[Any]:
        # The stream's length is unknown: hold one batch back to know which one is the last.
        iterator = iter(self._loader)
        pending = next(iterator, None)
        try:
            while pending is not None:
                batch, pending = pending, next(iterator, None)
                self.samples_seen += global_batch
                self.at_last_batch = pending is None
                yield _move(batch, self.device, self._non_blocking) if self._move else batch
        finally:
            self.at_last_batch = False
        self.epoch, self.samples_seen = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        """The position: the epoch and the global samples of it already yielded."""
        epoch, seen = self.epoch, self.samples_seen
        if self._epoch_complete(seen):
            epoch, seen = epoch + 1, 0  # the epoch is complete: resume at the next one
        return {"epoch": epoch, "samples_seen": seen, "world_size": self.world_size,
                "batch_size": self.batch_size}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Continue at the position `state_dict` recorded (possibly saved at another world size)."""
        self.epoch = int(state_dict["epoch"])
        self.samples_seen = int(state_dict["samples_seen"])
        if self._stream is not None and self.samples_seen % (self.batch_size * self.world_size):
            raise ValueError(
                "cannot resume an IterableDataset loader at a different world size or batch size "
                f"mid-epoch: {self.samples_seen} samples seen is not a whole number of global "
                f"batches of {self.batch_size * self.world_size}"
            )

    def __repr__(self) -> str:
        return (f"PreparedLoader(epoch={self.epoch}, samples_seen={self.samples_seen}, "
                f"batches={len(self)}, world_size={self.world_size}, device='{self.device}')")
