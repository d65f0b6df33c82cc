"""An IterableDataset sharded across ranks: every rank reads the stream, each keeps its chunk of a global batch."""


from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import IterableDataset

from trainloop.data.plans import _share_of_last


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
        return type(batch)({key: empty_like(value) for key, value in batch.items()})  # pyright: ignore[reportCallIssue]
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
