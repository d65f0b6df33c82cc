"""Collectives on pytrees of tensors: gather, reduce, broadcast, barrier, main_first, split.

Every function takes the run's state first and works unchanged on one process (where it is
the identity, or close to it) and on many. Trees are nested dicts, lists and tuples with
tensors (and, for `reduce`, Python numbers) at the leaves.

Across ranks the collectives must be called by every rank in the same order with trees of the
same structure, as with any torch.distributed collective. `gather` checks that itself and raises
the same clear error on every rank instead of hanging.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten, tree_unflatten

from trainloop.state import RunState

T = TypeVar("T")

_OPS = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM,
        "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def gather(state: RunState, tree: T) -> T:
    """All-gather every tensor of `tree` along dim 0, in rank order, on every rank.

    Sizes along dim 0 may differ per rank; the other dims and the dtypes must agree (a mismatch
    raises ValueError on every rank). Called while a prepared loader is on the last batch of its
    epoch, it drops the samples that sharding repeated to pad that batch, so gathering each
    batch's predictions counts every sample of the dataset exactly once.
    """
    if state.world_size == 1:
        return tree
    leaves, spec = tree_flatten(tree)
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
            raise TypeError(f"gather needs tensors with a batch dim 0 at every leaf (got {_describe(leaf)})")
    device = collective_device(state)
    signature = repr((str(spec), [(tuple(t.shape[1:]), str(t.dtype)) for t in leaves]))
    header = torch.tensor([len(leaves), zlib.crc32(signature.encode())], device=device)
    headers = _all_gather_equal(header, state.world_size)
    if any(not torch.equal(h, headers[0]) for h in headers):
        raise ValueError(
            "gather: the ranks passed trees of different structure, trailing shapes or dtypes "
            f"(this rank {state.rank}: {signature}); every rank must gather the same kind of data"
        )
    sizes = torch.stack(_all_gather_equal(
        torch.tensor([t.shape[0] for t in leaves], device=device), state.world_size)).tolist()
    padding = _loader_padding(state, sizes)
    gathered = []
    for index, leaf in enumerate(leaves):
        per_rank = [row[index] for row in sizes]
        longest = max(per_rank)
        padded = leaf.new_zeros((longest, *leaf.shape[1:]))
        padded[: leaf.shape[0]] = leaf
        parts = _all_gather_equal(padded.to(device), state.world_size)
        joined = torch.cat([part[:n] for part, n in zip(parts, per_rank)]).to(leaf.device)
        gathered.append(joined[: joined.shape[0] - padding] if padding else joined)
    return tree_unflatten(gathered, spec)


def _loader_padding(state: RunState, sizes: list[list[int]]) -> int:
    """The padding to drop: a loader is on its padded last batch and this is that batch's data."""
    for loader in state.loaders:
        if loader.at_last_batch and loader.padding:
            first_leaf = [row[0] for row in sizes]
            if len(set(first_leaf)) == 1 and first_leaf[0] * state.world_size > loader.padding:
                return loader.padding
    return 0


def reduce(state: RunState, tree: T, op: str = "mean") -> T:
    """Reduce every leaf of `tree` across ranks with `op` (sum, mean, max, min).

    Tensors come back as new tensors (the inputs are not modified); Python numbers as floats.
    """
    if op not in _OPS:
        raise ValueError(f"reduce op must be one of {sorted(_OPS)} (got {op!r})")
    if state.world_size == 1:
        return tree
    leaves, spec = tree_flatten(tree)
    device = collective_device(state)
    reduced = []
    for leaf in leaves:
        if isinstance(leaf, (int, float)) and not isinstance(leaf, bool):
            tensor = torch.tensor(float(leaf), dtype=torch.float64, device=device)
        elif isinstance(leaf, torch.Tensor):
            tensor = leaf.detach().to(device, copy=True)
            if op == "mean" and not tensor.is_floating_point():
                tensor = tensor.double()
        else:
            raise TypeError(f"reduce needs tensors or numbers at every leaf (got {_describe(leaf)})")
        dist.all_reduce(tensor, op=_OPS[op])
        if op == "mean":
            tensor /= state.world_size
        if isinstance(leaf, torch.Tensor):
            reduced.append(tensor.to(leaf.device))
        else:
            reduced.append(tensor.item())
    return tree_unflatten(reduced, spec)


def broadcast(state: RunState, obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` on every rank.

    A tree of tensors is broadcast tensor by tensor: every rank passes tensors of the same
    shapes and dtypes (as with torch.distributed.broadcast) and gets new tensors back. Anything
    else is pickled on `src` and unpickled on the other ranks: only ever between the ranks of
    this one job, never from a file or a socket of anyone else.
    """
    if state.world_size == 1:
        return obj
    leaves, spec = tree_flatten(obj)
    if leaves and all(isinstance(leaf, torch.Tensor) for leaf in leaves):
        device = collective_device(state)
        out = []
        for leaf in leaves:
            tensor = leaf.detach().to(device, copy=True)
            dist.broadcast(tensor, src=src)
            out.append(tensor.to(leaf.device))
        return tree_unflatten(out, spec)
    box = [obj if state.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(state: RunState) -> None:
    """Wait until every rank reaches this point."""
    if state.world_size > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first(state: RunState) -> Iterator[None]:
    """Run the block on the main process first, then on the others (downloads, preprocessing)."""
    if not state.is_main:
        barrier(state)
    yield
    if state.is_main:
        barrier(state)


def split(state: RunState, items: T) -> T:
    """This rank's contiguous share of `items` (a list, tuple, tensor or dict of them).

    Shares differ in size by at most one, the first ranks taking the extra items, so gathering
    the per-rank results in rank order restores the original order. A dict is split value by
    value (every value must have the same length).
    """
    if isinstance(items, dict):
        lengths = {len(v) for v in items.values()}
        if len(lengths) > 1:
            raise ValueError(f"split: the dict's values have different lengths {sorted(lengths)}")
        return type(items)({k: split(state, v) for k, v in items.items()})
    if not isinstance(items, (list, tuple, torch.Tensor)):
        raise TypeError(f"split needs a list, tuple, tensor or dict (got {type(items).__name__})")
    base, extra = divmod(len(items), state.world_size)
    start = state.rank * base + min(state.rank, extra)
    return items[start:start + base + (state.rank < extra)]


def _all_gather_equal(tensor: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return parts


def collective_device(state: RunState) -> torch.device:
    """Where collective buffers live: the run's device, except for backends that are CPU-only."""
    return torch.device("cpu") if state.topology.backend == "gloo" else state.device


def _describe(leaf: Any) -> str:
    if isinstance(leaf, torch.Tensor):
        return f"a {leaf.dim()}-dim tensor"
    return type(leaf).__name__
