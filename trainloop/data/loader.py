"""`PreparedLoader`: a DataLoader as `prepare` returns it (sharded, on the device, resumable).

How the samples are dealt to the ranks is `trainloop.data.plans`' job; this module re-builds
the user's loader around a plan and keeps its position.
"""


from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data.sampler import BatchSampler

from trainloop.data.plans import _BatchPlan, _loader_settings, _SamplePlan
from trainloop.data.stream import _as_is, _ShardedStream, empty_like


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
