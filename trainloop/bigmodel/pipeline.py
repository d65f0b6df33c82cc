"""`pipeline`: pipeline-parallel inference, one stage per rank, on `torch.distributed.pipelining`."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import (
    tree_flatten,
    tree_map_only,
    tree_unflatten,
    treespec_dumps,
    treespec_loads,
)

from trainloop.bigmodel._devices import _to_device
from trainloop.bigmodel._tensors import _find_keys, _load, _model_tensors, _ModelTensor
from trainloop.bigmodel.checkpoint_reader import (
    Checkpoint,
    _MappingCheckpoint,
    _open_checkpoint,
    _SafetensorsCheckpoint,
)

if TYPE_CHECKING:
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle

    from trainloop.state import RunState


def pipeline(state: RunState, model: nn.Module, example_args: Sequence[Any], *,
             split_points: Sequence[str] | None = None, n_microbatches: int | None = None,
             checkpoint: Checkpoint | None = None, broadcast: bool = False) -> PipelineRunner:
    """Split `model` into one stage per rank and return this rank's runner, for inference.

    Built on `torch.distributed.pipelining`: the model is traced with `torch.export` on a
    micro-batch of `example_args` (the whole batch, split into `n_microbatches`), cut before each
    of `split_points` (module names, each one torch's `SplitPoint.BEGINNING`), and run with the
    GPipe schedule. By default the cuts are evenly spaced among the blocks of the model's largest
    `nn.ModuleList`. Every rank calls `pipeline` with the same arguments.

    With `checkpoint`, the model is traced on the meta device and each rank loads only its own
    stage's weights from the checkpoint (in the dtypes the model's tensors have): build the model
    under `empty_weights()` and no rank ever holds the whole model. Without it, the model must
    have real weights, and each rank keeps its stage (moved to `state.device`).

    The runner takes batches shaped like `example_args` (export fixes the shapes). Its output is
    on the last rank, or on every rank with `broadcast=True`; other ranks get None.

    Raises ValueError for split points that are not modules or not `world_size - 1` of them, a
    batch that `n_microbatches` does not divide, or a meta model without `checkpoint`.
    """
    from torch.distributed.pipelining import ScheduleGPipe, SplitPoint
    from torch.distributed.pipelining import pipeline as trace_pipeline

    n_microbatches = state.world_size if n_microbatches is None else n_microbatches
    example_args = tuple(example_args)
    cuts = _split_points(model, split_points, state.world_size)
    microbatch = _first_microbatch(example_args, n_microbatches)
    tensors = _model_tensors(model.eval())
    if checkpoint is None and any(t.value.is_meta for t in tensors):
        raise ValueError("the model has weights on the meta device (built under empty_weights()?): pass "
                         "checkpoint= so that each rank loads its own stage's weights")
    on_meta = contextlib.nullcontext() if checkpoint is None else _all_on_meta(tensors)
    with on_meta, _restoring_forwards(model, cuts):
        pipe = trace_pipeline(model, _to_device(microbatch, "meta") if checkpoint is not None else microbatch,
                              split_spec={name: SplitPoint.BEGINNING for name in cuts})
    if checkpoint is not None:
        _load_stage(pipe.get_stage_module(state.rank), tensors, _open_checkpoint(checkpoint), state.device)
    schedule = ScheduleGPipe(pipe.build_stage(state.rank, state.device), n_microbatches=n_microbatches)
    return PipelineRunner(state, schedule, example_args, broadcast)


class PipelineRunner:
    """One rank's stage of a pipelined model. Call it on every rank with whole batches.

    The first rank's inputs are the ones used (other ranks may pass the same or nothing: pass
    them, and a wrongly shaped batch is refused on every rank instead of hanging the others).
    Returns the model's output on the last rank (on every rank when built with `broadcast=True`),
    None elsewhere.
    """

    def __init__(self, state: RunState, schedule: PipelineScheduleSingle, example_args: tuple,
                 broadcast: bool) -> None:
        self._schedule = schedule
        self._device = state.device
        self._rank, self._last = state.rank, state.world_size - 1
        self._broadcast = broadcast
        self._signature = _signature(example_args)

    def __call__(self, *args: Any) -> Any:
        if args and _signature(args) != self._signature:
            raise ValueError(f"this pipeline was traced for inputs {self._signature}, got {_signature(args)}: "
                             "torch.export fixes the shapes, so build a pipeline for each input shape")
        with torch.no_grad():
            if self._rank == 0:
                if not args:
                    raise ValueError("rank 0 runs the first stage: it must pass the inputs")
                output = self._schedule.step(*_to_device(args, self._device))
            else:
                output = self._schedule.step()
        if self._broadcast:
            return _broadcast_tree(output, self._last, self._rank, self._device)
        return output if self._rank == self._last else None


def _split_points(model: nn.Module, split_points: Sequence[str] | None, world_size: int) -> list[str]:
    if split_points is None:
        return _even_split_points(model, world_size)
    cuts = list(split_points)
    if len(cuts) != world_size - 1:
        raise ValueError(f"pipeline runs one stage per rank: {world_size} ranks need {world_size - 1} "
                         f"split point(s), got {len(cuts)} ({cuts})")
    for name in cuts:
        try:
            model.get_submodule(name)
        except AttributeError as error:
            raise ValueError(f"split point {name!r} is not a module of this {type(model).__name__}: "
                             "use names from model.named_modules()") from error
        if not name:
            raise ValueError("split point '' is the whole model: name the module each stage starts at")
    return cuts


def _even_split_points(model: nn.Module, world_size: int) -> list[str]:
    """Cuts evenly spaced among the blocks of the largest ModuleList (by parameter count)."""
    lists = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) and name]
    if not lists:
        raise ValueError("pipeline found no nn.ModuleList of blocks to split evenly: pass split_points=")
    name, blocks = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    if len(blocks) < world_size:
        raise ValueError(f"{name!r} has {len(blocks)} blocks, fewer than the {world_size} stages needed: "
                         "pass split_points=")
    return [f"{name}.{stage * len(blocks) // world_size}" for stage in range(1, world_size)]


def _first_microbatch(example_args: tuple, n_microbatches: int) -> tuple:
    leaves = [leaf for leaf in tree_flatten(example_args)[0] if isinstance(leaf, torch.Tensor)]
    sizes = {leaf.shape[0] for leaf in leaves if leaf.dim()}
    if len(sizes) != 1:
        raise ValueError(f"example_args need tensors with one batch size along dim 0 (got sizes {sorted(sizes)})")
    batch = sizes.pop()
    if n_microbatches < 1 or batch % n_microbatches:
        raise ValueError(f"the batch of {batch} does not split into n_microbatches={n_microbatches} equal "
                         "micro-batches: pick a divisor of the batch size")
    return tree_map_only(torch.Tensor, lambda tensor: tensor[: batch // n_microbatches], example_args)


def _signature(args: tuple) -> str:
    leaves, spec = tree_flatten(args)
    return ", ".join(f"{leaf.dtype}{list(leaf.shape)}" if isinstance(leaf, torch.Tensor) else repr(leaf)
                     for leaf in leaves) + f" ({spec.num_leaves} leaves)"


@contextlib.contextmanager
def _all_on_meta(tensors: list[_ModelTensor]) -> Iterator[None]:
    """Swap every real tensor of the model for a meta one while tracing, then put them back.

    torch.export cannot trace a model whose tensors mix meta and real devices (real buffers of an
    `empty_weights()` model); on meta, tracing also costs no memory.
    """
    real = [(tensor, tensor.value) for tensor in tensors if not tensor.value.is_meta]
    for tensor, value in real:
        tensor.put(value.to("meta"))
    try:
        yield
    finally:
        for tensor, value in real:
            tensor.set(value)


@contextlib.contextmanager
def _restoring_forwards(model: nn.Module, cuts: list[str]) -> Iterator[None]:
    """torch marks split points by setting `forward` on those module instances: undo it after tracing."""
    modules = [model.get_submodule(name) for name in cuts]
    try:
        yield
    finally:
        for module in modules:
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_orig_forward", None)


def _load_stage(stage: nn.Module, model_tensors: list[_ModelTensor],
                reader: _SafetensorsCheckpoint | _MappingCheckpoint, device: torch.device) -> None:
    """Load a traced stage's tensors (all meta, named as in the model) from the checkpoint."""
    origin = {name: tensor for tensor in model_tensors for name in tensor.names}
    tensors = _model_tensors(stage)
    for tensor in tensors:
        source = origin.get(tensor.names[0])
        if source is not None:
            tensor.aliases = source.names  # a tied weight may be saved under its other name
            tensor.initial = source.initial  # the real value a buffer was built with
    _find_keys(tensors, reader)
    _load(tensors, reader, device, dtype=None)


def _broadcast_tree(tree: Any, src: int, rank: int, device: torch.device) -> Any:
    """Rank `src`'s pytree of tensors on every rank: a JSON header (structure, dtypes, shapes),
    then the tensors. JSON, not `broadcast_object_list`, because that one unpickles."""
    if rank == src:
        leaves, spec = tree_flatten(tree)
        if all(isinstance(leaf, torch.Tensor) for leaf in leaves):
            header = {"spec": treespec_dumps(spec),
                      "leaves": [[str(leaf.dtype).removeprefix("torch."), list(leaf.shape)] for leaf in leaves]}
        else:  # tell the other ranks, who are waiting for the header, instead of leaving them hanging
            header = {"error": "broadcast=True needs a model output made of tensors (got "
                               f"{sorted({type(leaf).__name__ for leaf in leaves})})"}
        encoded = torch.frombuffer(bytearray(json.dumps(header).encode()), dtype=torch.uint8).to(device)
        length = torch.tensor([encoded.numel()], device=device)
    else:
        length = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(length, src)
    if rank != src:
        encoded = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    dist.broadcast(encoded, src)
    header = json.loads(bytes(encoded.cpu().tolist()))
    if "error" in header:
        raise TypeError(header["error"])
    received = []
    for index, (dtype_name, shape) in enumerate(header["leaves"]):
        if rank == src:
            tensor = leaves[index].to(device).contiguous()
        else:
            tensor = torch.empty(shape, dtype=getattr(torch, dtype_name), device=device)
        dist.broadcast(tensor, src)
        received.append(tensor)
    return tree_unflatten(received, treespec_loads(header["spec"]))
