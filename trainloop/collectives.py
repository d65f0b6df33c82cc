"""Collectives on pytrees of tensors: gather, reduce, broadcast, barrier, main_first, split.

Every function takes the run's state first and works unchanged on one process (where it is
the identity, or close to it) and on many. Trees are nested dicts, lists and tuples with
tensors (and, for `reduce`, Python numbers) at the leaves.

Across ranks the collectives must be called by every rank in the same order with trees of the
same structure, as with any torch.distributed collective. `gather` checks that itself and raises
the same clear error on every rank instead of hanging.
"""

from __future__ import annotations

import builtins
import contextlib
import zlib
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten

from trainloop.data import PreparedLoader
from trainloop.state import RunState

T = TypeVar("T")

_OPS = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM,
        "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def gather(state: RunState, tree: T, *, loader: PreparedLoader | None = None, sync_grads: bool = False) -> T:
    """All-gather every tensor of `tree` along dim 0, in rank order, on every rank.

    `sync_grads=True` keeps the autograd graph (contrastive losses over every rank's rows): the
    gradient that reaches this rank's rows is the sum of every rank's gradients for them, so a
    loss computed on each rank from the gathered rows gives, after DDP's average, the gradients
    of one process computing the mean of those losses. Without it, the gathered rows are
    constants, as with torch.distributed.all_gather.

    Sizes along dim 0 may differ per rank; the other dims and the dtypes must agree (a mismatch
    raises ValueError on every rank). Without `loader` nothing is ever dropped.

    With `loader=` (a prepared loader the rows come from, one row per sample) the rows that
    sharding repeated to pad that loader's last batch (`even_batches=True`) are dropped, so each
    sample of the dataset counts exactly once. The rows of every leaf must be, on each rank,
    those of the batch the loader yielded last (gather per batch) or of every batch it yielded
    this epoch (collect over the pass, gather once after the loop: rank r's trailing padded rows
    are dropped). Called mid-epoch there is no padding yet and nothing is dropped. Any other
    number of rows (several epochs collected, one row per token, per-batch values) cannot be
    matched to the samples: ValueError on every rank, naming the rank and the rows expected.
    """
    if loader is not None and not isinstance(loader, PreparedLoader):
        raise TypeError(
            f"gather(loader=) needs the loader prepare returned (a PreparedLoader), not a "
            f"{type(loader).__name__}"
        )
    leaves, spec = tree_flatten(tree)
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
            raise TypeError(f"gather needs tensors with a batch dim 0 at every leaf (got {_describe(leaf)})")
    # Each leaf's trailing padding rows on this rank; -1 where its rows do not match the loader.
    paddings = [0] * len(leaves)
    if loader is not None:
        paddings = [_padding_or_unmatched(loader, leaf.shape[0]) for leaf in leaves]
    # Under tensor parallelism the ranks of one group hold the same rows: gather over the ranks
    # that saw different batches only (the strategy's data-parallel group; None: every rank).
    group = state.strategy.data_parallel_group()
    size = state.world_size if group is None else dist.get_world_size(group)
    if size == 1:
        if -1 in paddings:
            raise ValueError(_unmatched_message(state, leaves, paddings, loader, [state.rank]))
        return tree  # one process: no sharding, so never any padding
    device = collective_device(state)
    signature = repr((str(spec), [(tuple(t.shape[1:]), str(t.dtype)) for t in leaves]))
    header = torch.tensor([len(leaves), zlib.crc32(signature.encode())], device=device)
    headers = _all_gather_equal(header, size, group)
    if any(not torch.equal(h, headers[0]) for h in headers):
        raise ValueError(
            "gather: the ranks passed trees of different structure, trailing shapes or dtypes "
            f"(this rank {state.rank}: {signature}); every rank must gather the same kind of data"
        )
    # One collective for every rank's sizes and paddings, leaf by leaf.
    counts = torch.tensor([t.shape[0] for t in leaves] + paddings, device=device)
    rows = torch.stack(_all_gather_equal(counts, size, group)).tolist()
    unmatched = [rank for rank, row in enumerate(rows) if -1 in row[len(leaves):]]
    if unmatched:
        raise ValueError(_unmatched_message(state, leaves, paddings, loader, unmatched))
    gathered = []
    for index, leaf in enumerate(leaves):
        per_rank = [row[index] for row in rows]
        kept = [row[index] - row[len(leaves) + index] for row in rows]
        if sync_grads and leaf.requires_grad:
            gathered.append(_GatherWithGrads.apply(leaf, per_rank, kept, device, group))
            continue
        padded = leaf.new_zeros((max(per_rank), *leaf.shape[1:]))
        padded[: leaf.shape[0]] = leaf
        parts = _all_gather_equal(padded.to(device), size, group)
        gathered.append(torch.cat([part[:n] for part, n in zip(parts, kept)]).to(leaf.device))
    return tree_unflatten(gathered, spec)


class _GatherWithGrads(torch.autograd.Function):
    """The all-gather of `gather(sync_grads=True)`: forward as `gather`; backward all-reduces
    (sums) the gradient of the whole gathered tensor and hands this rank its own rows' part.

    One all-reduce of the gathered size in backward, on any backend (gloo has no reduce-scatter).
    """

    @staticmethod
    def forward(ctx, leaf, per_rank, kept, device, group):
        rank = dist.get_rank(group)
        ctx.rows, ctx.kept, ctx.device, ctx.group = per_rank, kept, device, group
        ctx.start = sum(kept[:rank])
        ctx.mine = min(per_rank[rank], kept[rank])
        padded = leaf.new_zeros((max(per_rank), *leaf.shape[1:]))
        padded[: leaf.shape[0]] = leaf
        parts = _all_gather_equal(padded.to(device), len(per_rank), group)
        return torch.cat([part[:n] for part, n in zip(parts, kept)]).to(leaf.device)

    @staticmethod
    def backward(ctx, grad):
        total = grad.to(ctx.device, copy=True).contiguous()
        dist.all_reduce(total, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        mine = total[ctx.start:ctx.start + ctx.mine].to(grad.device)
        rows = ctx.rows[rank]
        if mine.shape[0] < rows:  # rows gather(loader=) dropped as padding get no gradient
            mine = torch.cat([mine, mine.new_zeros((rows - mine.shape[0], *mine.shape[1:]))])
        return mine, None, None, None, None


def _padding_or_unmatched(loader: PreparedLoader, num_rows: int) -> int:
    padding = loader.padding_rows(num_rows)
    return -1 if padding is None else padding


def _unmatched_message(state: RunState, leaves: list, paddings: list[int], loader: PreparedLoader,
                       ranks: list[int]) -> str:
    mine = [f"leaf {i}: {leaf.shape[0]} rows" for i, (leaf, p) in enumerate(zip(leaves, paddings)) if p == -1]
    here = f"; on this rank {state.rank}: {', '.join(mine)}" if mine else ""
    return (
        f"gather(loader=): the rows on rank(s) {ranks} do not match that loader's samples{here}; "
        f"this rank's loader yielded {loader.describe_rows()}. Pass loader= only with one row per "
        "sample of the loader's last batch or of its whole epoch so far, or leave it out "
        "(nothing is dropped then)"
    )


def reduce(state: RunState, tree: T, op: str = "mean") -> T:
    """Reduce every leaf of `tree` across ranks with `op` (sum, mean, max, min).

    Leaves are tensors or Python numbers (anything else raises TypeError, on one process too).
    Tensors come back as new, detached tensors (the inputs are not modified); Python numbers as
    floats. The mean of an integer tensor is exact (summed as integers) and comes back in the
    default float dtype, as torch's true division gives it. One process gives what many give.
    """
    if op not in _OPS:
        raise ValueError(f"reduce op must be one of {sorted(_OPS)} (got {op!r})")
    leaves, spec = tree_flatten(tree)
    for leaf in leaves:
        if isinstance(leaf, bool) or not isinstance(leaf, (int, float, torch.Tensor)):
            raise TypeError(f"reduce needs tensors or numbers at every leaf (got {_describe(leaf)})")
    world_size = state.world_size
    device = collective_device(state) if world_size > 1 else None
    reduced = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            tensor = leaf.detach().to(device, copy=True) if device is not None else leaf.detach().clone()
            if op == "mean" and not tensor.is_floating_point() and not tensor.is_complex():
                tensor = tensor.to(torch.int64)  # summed exactly; the division below gives a float
        else:
            tensor = torch.tensor(float(leaf), dtype=torch.float64, device=device)
        if world_size > 1:
            dist.all_reduce(tensor, op=_OPS[op])
        if op == "mean":
            tensor = tensor / world_size if not tensor.is_floating_point() else tensor.div_(world_size)
        if isinstance(leaf, torch.Tensor):
            reduced.append(tensor.to(leaf.device))
        else:
            reduced.append(tensor.item())
    return tree_unflatten(reduced, spec)


def broadcast(state: RunState, obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` on every rank.

    When every rank passes a tree of tensors of the same structure, shapes and dtypes
    (placeholders on the ranks other than `src`), it is broadcast tensor by tensor, and every
    rank gets new tensors back. A placeholder tree of other shapes or dtypes raises the same
    ValueError on every rank (checked inside one small all-gather, before any data moves).
    Anything else (`None` or any value on the other ranks, or no tensors on `src`) is pickled
    on `src` and unpickled on the other ranks, its tensors moved to this rank's device: only
    ever between the ranks of this one job, never from a file or a socket of anyone else.
    """
    if state.world_size == 1:
        return obj
    leaves, spec = tree_flatten(obj)
    tensors = bool(leaves) and all(isinstance(leaf, torch.Tensor) for leaf in leaves)
    device = collective_device(state)
    signature = repr((str(spec), [(tuple(t.shape), str(t.dtype)) for t in leaves])) if tensors else ""
    header = torch.tensor([int(tensors), zlib.crc32(signature.encode())], device=device)
    headers = torch.stack(_all_gather_equal(header, state.world_size)).tolist()
    if headers[src][0] and all(h == headers[src] for h in headers):
        out = []
        for leaf in leaves:
            tensor = leaf.detach().to(device, copy=True)
            dist.broadcast(tensor, src=src)
            out.append(tensor.to(leaf.device))
        return tree_unflatten(out, spec)
    if headers[src][0] and any(h[0] and h != headers[src] for h in headers):
        every_rank: list[Any] = [None] * state.world_size
        dist.all_gather_object(every_rank, signature)  # the failure path only: what each rank passed
        listed = "; ".join(f"rank {rank}: {sig}" for rank, sig in enumerate(every_rank))
        raise ValueError(
            f"broadcast: the tensors passed on some ranks do not match rank {src}'s in structure, "
            f"shape or dtype ({listed}). Pass a placeholder of the same shapes and dtypes as rank "
            f"{src}'s tensors on every rank, or None (any non-tensor) to receive whatever it sends"
        )
    box: list[Any] = [obj if state.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    received = box[0]
    if state.rank == src:
        return received
    return tree_map_only(torch.Tensor, lambda t: t.to(state.device), received)


def barrier(state: RunState) -> None:
    """Wait until every rank reaches this point."""
    if state.world_size > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first(state: RunState, *, local: bool = False) -> Iterator[None]:
    """Run the block on the main process first, then on the others (downloads, preprocessing).

    `local=True`: the first process of each machine (`state.is_local_main`) runs it first, then
    the others of that machine: a download or cache per node, for machines without a shared disk.
    """
    first = state.is_local_main if local else state.is_main
    if not first:
        barrier(state)
    yield
    if first:
        barrier(state)


def print(state: RunState, *args: Any, **kwargs: Any) -> None:
    """`print(*args, **kwargs)` on the main process only; nothing elsewhere."""
    if state.is_main:
        builtins.print(*args, **kwargs)


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
    return items[start:start + base + (state.rank < extra)]  # pyright: ignore[reportReturnType]  (a slice of T is a T)


def _all_gather_equal(tensor: torch.Tensor, world_size: int, group: Any = None) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def collective_device(state: RunState) -> torch.device:
    """Where collective buffers live: the run's device, except for backends that are CPU-only."""
    return torch.device("cpu") if state.topology.backend == "gloo" else state.device


def _describe(leaf: Any) -> str:
    if isinstance(leaf, torch.Tensor):
        return f"a {leaf.dim()}-dim tensor"
    return type(leaf).__name__


# -- The small tools: one rank's flag to all, any object from every rank, padding before a gather.
# Named `any_rank` and `all_ranks` here because `gather` above calls the builtin `any`; the
# package exports them as `tl.any` and `tl.all`.


def any_rank(state: RunState, flag: bool | torch.Tensor) -> bool:
    """True on every rank if `flag` is true on any rank (one rank's early stop reaches all).

    `flag` is a bool or a bool tensor (any shape: true if any element is). Every rank must call
    it, at the same point of the loop; the answer is the same plain bool everywhere. This is
    Accelerate's `set_trigger`/`check_trigger` pair in one call.
    """
    return _agree(state, flag, dist.ReduceOp.MAX, "any")


def all_ranks(state: RunState, flag: bool | torch.Tensor) -> bool:
    """True on every rank if `flag` is true on every rank (a bool tensor: all its elements)."""
    return _agree(state, flag, dist.ReduceOp.MIN, "all")


def _agree(state: RunState, flag: bool | torch.Tensor, op: dist.ReduceOp, name: str) -> bool:
    if isinstance(flag, torch.Tensor):
        if flag.dtype != torch.bool:
            raise TypeError(f"tl.{name} needs a bool or a bool tensor (got a {flag.dtype} tensor); "
                            "compare it first, e.g. loss.isnan()")
        local = bool(flag.any() if name == "any" else flag.all())
    elif isinstance(flag, bool):
        local = flag
    else:
        raise TypeError(f"tl.{name} needs a bool or a bool tensor (got {type(flag).__name__})")
    if state.world_size == 1:
        return local
    vote = torch.tensor(int(local), device=collective_device(state))
    dist.all_reduce(vote, op=op)
    return bool(vote.item())


def gather_object(state: RunState, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (`[obj]` on one process).

    Any picklable object (a dict of per-rank statistics, a list of strings). It is pickled here
    and unpickled on the other ranks: use it only between the ranks of this one job, never for
    data read from a file or a socket of anyone else (unpickling runs code). For tensors,
    `gather` is faster and keeps them on the device.
    """
    if state.world_size == 1:
        return [obj]
    objects: list[Any] = [None] * state.world_size
    dist.all_gather_object(objects, obj)
    return objects


def pad(state: RunState, tensor: torch.Tensor, dim: int = 0, value: float = 0) -> torch.Tensor:
    """`tensor` padded with `value` along `dim` to the largest size any rank has there.

    For gathering what differs in length along a dim other than 0 (generated sequences of
    different lengths: pad along dim 1, then `gather` along dim 0). The padding goes at the end;
    the other dims are left as they are. Every rank passes a tensor with the same number of dims
    (else ValueError on every rank). One small collective; on one process `tensor` itself.
    """
    if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
        got = f"a {tensor.dim()}-dim tensor" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise TypeError(f"pad needs a tensor with at least one dim (got {got})")
    if not -tensor.dim() <= dim < tensor.dim():
        raise ValueError(f"pad: dim {dim} is out of range for a {tensor.dim()}-dim tensor")
    dim %= tensor.dim()
    if state.world_size == 1:
        return tensor
    header = torch.tensor([tensor.dim(), dim, tensor.shape[dim]], device=collective_device(state))
    headers = torch.stack(_all_gather_equal(header, state.world_size)).tolist()
    if any(h[:2] != headers[0][:2] for h in headers):
        raise ValueError(
            "pad: the ranks passed tensors with different numbers of dims or a different dim "
            f"(rank: (dims, dim) = {[(h[0], h[1]) for h in headers]}); every rank pads the same dim")
    longest = max(h[2] for h in headers)
    if longest == tensor.shape[dim]:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = longest
    padded = tensor.new_full(shape, value)
    padded.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    return padded
