"""Prepared data loaders: sharded across ranks, seeded shuffling, batches on the device, resumable.

How a map-style dataset is cut up, every epoch:

1. The epoch's *order* of sample indices: a permutation from a generator seeded `seed + epoch`
   when the user's loader shuffled, `0..n-1` when it did not, or what the user's own sampler
   draws under torch's (and Python's) RNG seeded `seed + epoch`. Every rank computes the same
   order (a custom sampler's is checked across ranks once per epoch).
2. The order is read in *global batches* of `batch_size * world_size` samples; rank r takes the
   r-th contiguous chunk of each. Gathering a batch across ranks therefore gives back the
   global batch in order, and one process with `batch_size * world_size` sees the same batches.
3. A last, partial global batch (unless `drop_last`):
   - `even_batches=True` (the default): split evenly and padded by wrapping around to the start
     of the order, so every rank gets a batch of the same size. The padding rows are real
     samples seen twice: they are trained on (the update differs from the big batch's) and
     `gather(..., loader=)` drops them again. They sit at the end of the last ranks' chunks.
   - `even_batches=False`: split unevenly, the first ranks taking one sample more; a rank left
     with no sample yields an *empty* batch (0 rows, the structure of a real one). Every rank
     still yields the same number of batches, so every rank takes part in every collective,
     and with `num_items` the update equals the big batch's exactly.

A DataLoader with its own batch sampler (`batch_sampler=`, e.g. length bucketing, or
`sampler=<a BatchSampler>` with `batch_size=None`) is dealt in the sampler's batches instead:
each epoch the sampler is drawn once under torch's RNG seeded `seed + epoch` (after
`set_epoch(epoch)` where it has one); *round* j is its batches `j*W .. j*W + W-1` and rank r
takes the r-th. In a short last round the ranks without a batch repeat the epoch's first batches
(`even_batches=True`, dropped by `gather(loader=)`) or yield an empty batch (`False`).

The position within the epoch is kept as a count of global samples already yielded (of the
sampler's batches, for a batch sampler). Resuming starts at that offset: the skipped samples are
never read. A different world size on resume re-shards the rest of the epoch from the same offset.
"""


from __future__ import annotations

import collections
import contextlib
import math
import random
import sys
import zlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

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


class _Dealt(NamedTuple):
    """One batch of this rank, as a plan deals it."""

    indices: torch.Tensor  # what this rank reads; for an empty batch one index, read for its structure only
    rows: int  # rows this rank yields: len(indices), or 0 for an empty batch
    padding: int  # trailing rows of them that repeat samples (even_batches' padding)
    advance: int  # how far the global position moves (samples, or the sampler's batches)
    samples: int  # real samples of the global batch, all ranks together


@contextlib.contextmanager


def _seeded_draws(seed: int) -> Iterator[None]:
    """torch's, Python's (and NumPy's, if imported) global RNGs seeded `seed`; restored after.

    A user's sampler draws from them: seeded alike, every rank draws the same order, and a
    resumed run draws the epoch's order again as the uninterrupted run did.
    """
    python_state = random.getstate()
    numpy = sys.modules.get("numpy")
    numpy_state = numpy.random.get_state() if numpy is not None else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        if numpy is not None:
            numpy.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(python_state)
            if numpy is not None:
                numpy.random.set_state(numpy_state)


def _check_same_on_every_rank(values: torch.Tensor, device: torch.device, what: str) -> None:
    """Raise on every rank unless `values` is the same on every rank (one small all-reduce).

    A user's sampler that draws from its own unseeded RNG, or a DistributedSampler, gives each
    rank a different order: the shards would overlap and miss samples without a word.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    checksum = zlib.crc32(values.to(torch.int64).numpy().tobytes())
    if dist.get_backend() == "gloo":  # CPU-only; nccl and the like need the run's device
        device = torch.device("cpu")
    extremes = torch.tensor([checksum, -checksum], dtype=torch.int64, device=device)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    if extremes[0].item() != -extremes[1].item():
        raise ValueError(
            f"{what} differs between ranks: it must draw its randomness from torch's (or Python's) "
            "global RNG, which prepare seeds with seed + epoch, or from set_epoch(epoch). Do not "
            "use a DistributedSampler: prepare shards the data itself"
        )


def _feed(plan: _SamplePlan | _BatchPlan) -> Iterator[list[int]]:
    """The indices a plan deals, for the DataLoader; what each batch is waits in `plan.dealt`.

    The DataLoader iterates its batch sampler ahead of the batches it hands out (prefetching,
    workers), in order; the PreparedLoader takes one record off `plan.dealt` per batch it yields.
    """
    dealt = plan.dealt
    for batch in plan.deal():
        dealt.append(batch)
        yield batch.indices.tolist()


def _share_of_last(real: int, rank: int, world_size: int, even: bool) -> tuple[int, int, int, int]:
    """This rank's share of a last, partial global batch of `real` samples.

    Returns `(start, stop, padding, total_padding)`: the share is positions `start:stop` of the
    global batch once `total_padding` repeated samples are appended to it, and its last `padding`
    positions are such repeats. Even: every rank takes `ceil(real / world_size)` positions, so the
    repeats end the last ranks' shares. Uneven: no repeats; the first ranks take one sample more
    and a rank may take none (`start == stop`).
    """
    if even:
        per_rank = math.ceil(real / world_size)
        start, stop = rank * per_rank, (rank + 1) * per_rank
        return start, stop, stop - min(max(real, start), stop), per_rank * world_size - real
    base, extra = divmod(real, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra), 0, 0


class _SamplePlan:
    """Which indices this rank reads, batch by batch: a per-sample sampler and a batch size.

    It is the re-built DataLoader's batch sampler: `begin(epoch, start)` sets up a pass, then the
    DataLoader iterates it (`_feed`).
    """

    def __init__(self, loader: DataLoader, *, rank: int, world_size: int, seed: int,
                 even_batches: bool, device: torch.device):
        # DataLoader(batch_size=...) and DataLoader(batch_sampler=BatchSampler(...)) both end up
        # as a plain BatchSampler; its sampler, size and drop_last are all we need.
        batch_sampler = loader.batch_sampler
        self.sampler = batch_sampler.sampler
        self.batch_size = batch_sampler.batch_size
        self.drop_last = batch_sampler.drop_last
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.even_batches, self.device = even_batches, device
        self.num_samples = len(self.sampler)
        self.epoch, self.start = 0, 0
        self.dealt: collections.deque[_Dealt] = collections.deque()  # dealt, not yet yielded
        self._order: torch.Tensor | None = None
        self._checked_epoch: int | None = None

    def num_batches(self, epoch: int, start: int = 0) -> int:
        remaining = self.num_samples - start
        size = self.batch_size * self.world_size
        return remaining // size if self.drop_last else math.ceil(remaining / size)

    def order(self, epoch: int) -> torch.Tensor:
        """The global sample order of `epoch`: the same on every rank."""
        if isinstance(self.sampler, SequentialSampler):
            return torch.arange(self.num_samples)
        if isinstance(self.sampler, RandomSampler) and not self.sampler.replacement:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            return torch.randperm(self.num_samples, generator=generator)
        # Any other sampler draws from the global RNGs: seed them for this epoch alone.
        with _seeded_draws(self.seed + epoch):
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(epoch)
            order = torch.tensor(list(self.sampler), dtype=torch.long)
        if self._checked_epoch != epoch:
            _check_same_on_every_rank(order, self.device, f"the sampler's order of epoch {epoch}")
            self._checked_epoch = epoch
        return order

    def begin(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start
        self._order = self.order(epoch)
        self.dealt = collections.deque()

    def __len__(self) -> int:
        return self.num_batches(self.epoch, self.start)

    def __iter__(self) -> Iterator[list[int]]:
        return _feed(self)

    def deal(self) -> Iterator[_Dealt]:
        order, rank, world = self._order, self.rank, self.world_size
        size, batch_size = self.batch_size * world, self.batch_size
        for begin in range(self.start, self.start + len(self) * size, size):
            chunk = order[begin:begin + size]
            real = len(chunk)
            if real == size:
                yield _Dealt(chunk[rank * batch_size:(rank + 1) * batch_size], batch_size, 0, size, size)
                continue
            start, stop, padding, total_padding = _share_of_last(real, rank, world, self.even_batches)
            if total_padding:  # wrap around to the start of the epoch's order
                chunk = torch.cat([chunk, order.repeat(math.ceil(total_padding / len(order)) + 1)[:total_padding]])
            if start == stop:  # no sample left for this rank: one index, read for its structure only
                yield _Dealt(chunk[:1], 0, 0, real, real)
            else:
                yield _Dealt(chunk[start:stop], stop - start, padding, real, real)


class _BatchPlan:
    """Which of a user's batch sampler's batches this rank reads: the r-th of every round of W.

    The epoch's batches are drawn once (indices only: no sample is read) under the seeded RNGs
    and kept as one flat tensor, so a resumed pass starts at its round without reading the
    batches before it.
    """

    def __init__(self, batch_sampler: Any, *, rank: int, world_size: int, seed: int,
                 even_batches: bool, device: torch.device):
        self.batch_sampler = batch_sampler
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.even_batches, self.device = even_batches, device
        self.batch_size = None  # the sampler decides each batch's size
        self.epoch, self.start = 0, 0
        self.dealt: collections.deque[_Dealt] = collections.deque()  # dealt, not yet yielded
        self._drawn: tuple[int, torch.Tensor, torch.Tensor] | None = None  # epoch, indices, offsets
        self._checked_epoch: int | None = None

    def batches(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampler's batches of `epoch`, as (all indices in order, offsets of each batch)."""
        if self._drawn is None or self._drawn[0] != epoch:
            with _seeded_draws(self.seed + epoch):
                if hasattr(self.batch_sampler, "set_epoch"):
                    self.batch_sampler.set_epoch(epoch)
                drawn = [list(batch) for batch in self.batch_sampler]
            if any(not batch for batch in drawn):
                raise ValueError(f"the batch sampler yielded an empty batch in epoch {epoch}")
            lengths = torch.tensor([len(batch) for batch in drawn], dtype=torch.long)
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
            indices = torch.tensor([i for batch in drawn for i in batch], dtype=torch.long)
            self._drawn = (epoch, indices, offsets)
        return self._drawn[1], self._drawn[2]

    def num_batches(self, epoch: int, start: int = 0) -> int:
        _, offsets = self.batches(epoch)
        return math.ceil(max(len(offsets) - 1 - start, 0) / self.world_size)

    def begin(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start
        self.dealt = collections.deque()
        indices, offsets = self.batches(epoch)
        if self._checked_epoch != epoch:  # here, not in len(): every rank iterates, not all ask len()
            _check_same_on_every_rank(torch.cat([offsets, indices]), self.device,
                                      f"the batch sampler's batches of epoch {epoch}")
            self._checked_epoch = epoch

    def __len__(self) -> int:
        return self.num_batches(self.epoch, self.start)

    def __iter__(self) -> Iterator[list[int]]:
        return _feed(self)

    def deal(self) -> Iterator[_Dealt]:
        indices, offsets = self.batches(self.epoch)
        bounds = offsets.tolist()
        num_batches, rank, world = len(bounds) - 1, self.rank, self.world_size
        for first in range(self.start, num_batches, world):
            in_round = min(world, num_batches - first)
            samples = bounds[first + in_round] - bounds[first]
            mine = first + rank
            if mine < num_batches:
                batch = indices[bounds[mine]:bounds[mine + 1]]
                yield _Dealt(batch, len(batch), 0, in_round, samples)
            elif self.even_batches:  # a short last round: repeat the epoch's first batches
                repeat = (mine - num_batches) % num_batches
                batch = indices[bounds[repeat]:bounds[repeat + 1]]
                yield _Dealt(batch, len(batch), len(batch), in_round, samples)
            else:
                yield _Dealt(indices[bounds[first]:bounds[first] + 1], 0, 0, in_round, samples)
