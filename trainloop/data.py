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
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

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


def _as_is(batch: Any) -> Any:
    """The re-built stream loader's collate_fn: the stream collates its batches itself."""
    return batch


class _ShardedStream(IterableDataset):
    """An IterableDataset read by every rank; rank r keeps its chunk of each global batch.

    Every rank reads the whole stream, so all of them see the same global batches and agree on
    where the stream ends. With DataLoader workers, worker w handles global batches w, w+W, ...
    and the DataLoader's round-robin over workers keeps the order. It yields
    `(batch, rows, padding)`: collated here, so that what a batch holds travels with it out of
    the worker processes.
    """

    def __init__(self, dataset: IterableDataset, batch_size: int, drop_last: bool,
                 rank: int, world_size: int, even_batches: bool, collate_fn: Any):
        self.dataset, self.batch_size, self.drop_last = dataset, batch_size, drop_last
        self.rank, self.world_size, self.even_batches = rank, world_size, even_batches
        self.collate_fn = collate_fn
        self.skip_batches = 0

    def __iter__(self) -> Iterator[tuple[Any, int, int]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        size = self.batch_size * self.world_size
        rank, batch_size = self.rank, self.batch_size
        group: list[Any] = []
        index = 0
        for sample in self.dataset:
            group.append(sample)
            if len(group) == size:
                if index >= self.skip_batches and index % num_workers == worker:
                    yield self.collate_fn(group[rank * batch_size:(rank + 1) * batch_size]), batch_size, 0
                group, index = [], index + 1
        if group and not self.drop_last and index >= self.skip_batches and index % num_workers == worker:
            real = len(group)
            start, stop, padding, total_padding = _share_of_last(real, rank, self.world_size, self.even_batches)
            group = group + [group[i % real] for i in range(total_padding)]  # wraps within the group
            if start == stop:
                yield empty_like(self.collate_fn(group[:1])), 0, 0
            else:
                yield self.collate_fn(group[start:stop]), stop - start, padding


def empty_like(batch: Any) -> Any:
    """`batch` with 0 rows: tensors sliced to `[:0]`, lists of per-sample values emptied.

    The batch a rank without samples yields under `even_batches=False`. Containers (dicts,
    namedtuples, lists and tuples of tensors or containers) keep their structure; a list of
    per-sample values (strings, numbers) becomes empty. Anything else cannot be emptied honestly
    (a per-batch count would be wrong): TypeError.
    """
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, Mapping):
        return type(batch)({key: empty_like(value) for key, value in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(empty_like(value) for value in batch))
    if isinstance(batch, (list, tuple)):
        if all(isinstance(v, (torch.Tensor, Mapping, list, tuple)) for v in batch) and batch:
            return type(batch)(empty_like(value) for value in batch)
        return type(batch)()
    raise TypeError(
        f"even_batches=False gives a rank without samples an empty batch, made by slicing a real "
        f"batch to 0 rows, and cannot empty a {type(batch).__name__}: have the collate_fn return "
        "tensors (in dicts, lists or tuples), or use even_batches=True"
    )


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


def _user_batch_sampler(loader: DataLoader) -> Any:
    """The user's own batch sampler, or None when the loader batches samples by `batch_size`."""
    if loader.batch_sampler is not None:
        # A plain BatchSampler is just a sampler and a batch size: dealt sample by sample.
        return None if type(loader.batch_sampler) is BatchSampler else loader.batch_sampler
    if isinstance(loader.sampler, BatchSampler):  # DataLoader(sampler=BatchSampler(...), batch_size=None)
        return loader.sampler
    raise TypeError(
        "prepare needs batched DataLoaders: DataLoader(..., batch_size=None) turns batching off; "
        "give it a batch_size, a batch_sampler=, or a sampler=BatchSampler(...) with batch_size=None"
    )


class PreparedLoader:
    """A DataLoader as `prepare` returns it. Iterate it like the original.

    - Batches arrive on the run's device (pytrees of tensors: dicts, lists, tuples, namedtuples).
    - Each rank gets its shard; every rank gets the same number of batches (with
      `even_batches=False` the last one may be smaller, or empty, on some ranks).
    - `epoch` is the epoch the next (or current) pass belongs to; a pass that runs to the end
      advances it. A pass that is broken off continues where it stopped on the next `iter()`.
    - `state_dict()` / `load_state_dict()` save and restore the position: a restored loader
      yields exactly the batches not yet seen, in the same order, without reading the others;
      `check_state_dict()` says whether a position fits this loader without restoring it.
    - `padding_rows(num_rows)` tells `gather(..., loader=)` which rows sharding repeated.
    """

    def __init__(self, loader: DataLoader, *, device: torch.device, rank: int,
                 world_size: int, seed: int, even_batches: bool = True):
        if getattr(loader, "in_order", True) is False and loader.num_workers > 0:
            raise ValueError(
                "prepare needs DataLoader(in_order=True) with workers: positions, padding and "
                "the epoch's last batch are counted in the order the batches were dealt"
            )
        self.original = loader
        self.device = device
        self.world_size = world_size
        self.even_batches = even_batches
        self.epoch = 0
        self.samples_seen = 0  # global samples of this epoch already yielded, all ranks
        self._position = 0  # the same in the plan's unit: samples, or the batch sampler's batches
        self.at_last_batch = False
        # What this rank yielded, for gather(loader=): its last batch's rows and padding, its
        # rows this epoch so far. Kept after the pass ends, until the next epoch's first batch.
        self._yielded_epoch: int | None = None
        self._batch_rows = self._batch_padding = self._epoch_rows = 0
        self._move = device.type != "cpu"
        self._non_blocking = bool(loader.pin_memory)
        settings = _loader_settings(loader)
        # The DataLoader draws its workers' base seed from this generator when a pass starts.
        # Without one it would draw from torch's global RNG, so a run resumed mid-epoch would
        # see different dropout than the uninterrupted run. Re-seeded per pass in __iter__.
        self._seed, self._rank = seed, rank
        self._generator = torch.Generator()
        settings["generator"] = self._generator
        self._stream: _ShardedStream | None = None
        self._plan: _SamplePlan | _BatchPlan | None = None
        if isinstance(loader.dataset, IterableDataset):
            if loader.batch_size is None:
                raise TypeError("prepare needs batched DataLoaders: give the IterableDataset's "
                                "DataLoader a batch_size")
            self._stream = _ShardedStream(loader.dataset, loader.batch_size, loader.drop_last, rank,
                                          world_size, even_batches, settings.pop("collate_fn"))
            self._loader = DataLoader(self._stream, batch_size=None, collate_fn=_as_is, **settings)
            self.batch_size: int | None = loader.batch_size
            return
        shared = {"rank": rank, "world_size": world_size, "seed": seed,
                  "even_batches": even_batches, "device": device}
        user_batches = _user_batch_sampler(loader)
        if user_batches is None:
            self._plan = _SamplePlan(loader, **shared)
            self._loader = DataLoader(loader.dataset, batch_sampler=self._plan, **settings)
        else:
            self._plan = _BatchPlan(user_batches, **shared)
            if loader.batch_sampler is None:  # the dataset takes a list of indices itself
                self._loader = DataLoader(loader.dataset, sampler=self._plan, batch_size=None, **settings)
            else:
                self._loader = DataLoader(loader.dataset, batch_sampler=self._plan, **settings)
        self.batch_size = self._plan.batch_size

    @property
    def dataset(self):
        return self.original.dataset

    @property
    def padding(self) -> int:
        """Trailing rows of this rank's last batch that sharding repeated (0 but on a padded last batch)."""
        return self._batch_padding

    def padding_rows(self, num_rows: int) -> int | None:
        """How many trailing rows of `num_rows` collected on this rank from this loader are padding.

        `num_rows` must be one row per sample either of the batch this loader yielded last, or of
        every batch it yielded this epoch (the pass that just ended, after the loop). Padding
        exists only in an epoch's last batch, at its end, so it is the same count either way.
        Returns None for any other number of rows: the rows cannot be matched to the samples.
        """
        if num_rows == self._batch_rows or num_rows == self._epoch_rows:
            return self._batch_padding if num_rows else 0
        return None

    def describe_rows(self) -> str:
        """What `padding_rows` accepts on this rank, for error messages."""
        return (f"{self._batch_rows} rows (its last batch) or {self._epoch_rows} rows (every batch "
                f"of epoch {self._yielded_epoch if self._yielded_epoch is not None else self.epoch} "
                "so far)")

    def __len__(self) -> int:
        """Batches per rank in a whole epoch."""
        if self._plan is None:
            return len(self.original) // self.world_size
        return self._plan.num_batches(self.epoch, 0)

    def __iter__(self) -> Iterator[Any]:
        if self._epoch_complete(self._position):
            self.epoch, self.samples_seen, self._position = self.epoch + 1, 0, 0
        self._generator.manual_seed(hash((self._seed, self._rank, self.epoch)) & (2**63 - 1))
        if self._plan is not None:
            yield from self._iterate_plan()
        else:
            self._stream.skip_batches = self.samples_seen // (self.batch_size * self.world_size)
            yield from self._iterate_stream(self.batch_size * self.world_size)

    def _epoch_complete(self, position: int) -> bool:
        """Nothing of the epoch is left (a pass was broken off after its last batch)."""
        return self._plan is not None and position > 0 and self._plan.num_batches(self.epoch, position) == 0

    def _yielded(self, rows: int, padding: int) -> None:
        if self._yielded_epoch != self.epoch:
            self._yielded_epoch, self._epoch_rows = self.epoch, 0
        self._batch_rows, self._batch_padding = rows, padding
        self._epoch_rows += rows

    def _iterate_plan(self) -> Iterator[Any]:
        plan = self._plan
        plan.begin(self.epoch, self._position)
        remaining = len(plan)
        try:
            for batch in self._loader:
                dealt = plan.dealt.popleft()  # what this batch is (the feed dealt it, in order)
                remaining -= 1
                self._position += dealt.advance
                self.samples_seen += dealt.samples
                self.at_last_batch = remaining == 0
                if dealt.rows == 0:  # an empty batch: a real one's structure, 0 rows
                    batch = empty_like(batch)
                self._yielded(dealt.rows, dealt.padding)
                yield _move(batch, self.device, self._non_blocking) if self._move else batch
        finally:
            self.at_last_batch = False
        self.epoch, self.samples_seen, self._position = self.epoch + 1, 0, 0

    def _iterate_stream(self, global_batch: int) -> Iterator[Any]:
        # The stream's length is unknown: hold one batch back to know which one is the last.
        iterator = iter(self._loader)
        pending = next(iterator, None)
        try:
            while pending is not None:
                (batch, rows, padding), pending = pending, next(iterator, None)
                self.samples_seen += global_batch
                self.at_last_batch = pending is None
                self._yielded(rows, padding)
                yield _move(batch, self.device, self._non_blocking) if self._move else batch
        finally:
            self.at_last_batch = False
        self.epoch, self.samples_seen = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int | None]:
        """The position: the epoch and the global samples (and sampler batches) of it already yielded."""
        epoch, seen, position = self.epoch, self.samples_seen, self._position
        if self._epoch_complete(position):
            epoch, seen, position = epoch + 1, 0, 0  # the epoch is complete: resume at the next one
        state = {"epoch": epoch, "samples_seen": seen, "world_size": self.world_size,
                 "batch_size": self.batch_size}
        if isinstance(self._plan, _BatchPlan):
            state["batches_seen"] = position
        return state

    def check_state_dict(self, state_dict: dict[str, int | None]) -> None:
        """Raise ValueError if `state_dict` cannot be restored into this loader; change nothing."""
        deals_batches = isinstance(self._plan, _BatchPlan)
        if deals_batches != ("batches_seen" in state_dict):
            saved = "a batch sampler's batches" if "batches_seen" in state_dict else "samples"
            mine = "a batch sampler's batches" if deals_batches else "samples"
            raise ValueError(
                f"this loader position counts {saved}, but the loader being restored deals {mine}: "
                "prepare the loader the checkpoint was saved with (the same batch_sampler or batch_size)"
            )
        if self._stream is not None and int(state_dict["samples_seen"]) % (self.batch_size * self.world_size):
            raise ValueError(
                "cannot resume an IterableDataset loader at a different world size or batch size "
                f"mid-epoch: {state_dict['samples_seen']} samples seen is not a whole number of global "
                f"batches of {self.batch_size * self.world_size}"
            )

    def load_state_dict(self, state_dict: dict[str, int | None]) -> None:
        """Continue at the position `state_dict` recorded (possibly saved at another world size)."""
        self.check_state_dict(state_dict)
        self.epoch = int(state_dict["epoch"])
        self.samples_seen = int(state_dict["samples_seen"])
        batches_seen = state_dict.get("batches_seen")
        self._position = self.samples_seen if batches_seen is None else int(batches_seen)
        self._yielded_epoch, self._batch_rows, self._batch_padding, self._epoch_rows = None, 0, 0, 0

    def __repr__(self) -> str:
        return (f"PreparedLoader(epoch={self.epoch}, samples_seen={self.samples_seen}, "
                f"batches={len(self)}, world_size={self.world_size}, device='{self.device}')")
