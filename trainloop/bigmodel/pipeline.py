"""`pipeline`: pipeline-parallel inference, one stage per rank, on `torch.distributed.pipelining`."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._pytree import (
    TreeSpec,
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
from trainloop.bigmodel.key_map import KeyMap, model_names

if TYPE_CHECKING:
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle

    from trainloop.state import RunState


def pipeline(state: RunState, model: nn.Module, example_args: Sequence[Any] = (),
             example_kwargs: Mapping[str, Any] | None = None, *,
             split_points: Sequence[str] | None = None, n_microbatches: int | None = None,
             checkpoint: Checkpoint | None = None, key_map: KeyMap | None = None,
             broadcast: bool = False) -> PipelineRunner:
    """Split `model` into one stage per rank and return this rank's runner, for inference.

    Built on `torch.distributed.pipelining`: the model is traced with `torch.export` on a
    micro-batch of `example_args` and `example_kwargs` (the whole batch, split into
    `n_microbatches`), cut before each of `split_points` (module names, each one torch's
    `SplitPoint.BEGINNING`), and run with the GPipe schedule. By default the cuts are evenly
    spaced among the blocks of the model's largest `nn.ModuleList`. Every rank calls `pipeline`
    with the same arguments.

    Tracing runs on fake tensors (shapes and dtypes, no data) on `state.device`, so it costs no
    memory and whatever the model computes a device from (`torch.arange(..., device=x.device)`,
    rotary embeddings' `inv_freq.to(x.device)`) is this rank's device, not a stand-in's. Then each
    rank gives its own stage its real tensors: with `checkpoint`, loaded from the checkpoint (in
    the dtypes the model's tensors have; `key_map` and the base-model prefix as in `dispatch`),
    so a model built under `empty_weights()` is never held whole by any rank; without it, the
    model's own tensors, moved to `state.device`.

    Keyword inputs: tensors in `example_kwargs` (`attention_mask=`) are inputs like the
    positional ones; other values (`use_cache=False`) are fixed when tracing and may be left out
    of the runner's calls. A model whose forward takes `use_cache` gets `use_cache=False` unless
    given: a key-value cache has no meaning across micro-batches.

    The runner takes batches shaped like the examples (export fixes the shapes). Its output has
    the model's own output type (a Hugging Face `ModelOutput` with `.logits`, a dict, a tensor)
    and is on the last rank, or on every rank with `broadcast=True`; other ranks get None.

    Raises ValueError for split points that are not modules or not `world_size - 1` of them, a
    batch that `n_microbatches` does not divide, or a meta model without `checkpoint`.
    """
    from torch.distributed.pipelining import ScheduleGPipe, SplitPoint
    from torch.distributed.pipelining import pipeline as trace_pipeline

    n_microbatches = state.world_size if n_microbatches is None else n_microbatches
    example_args = tuple(example_args)
    inputs, constants = _split_kwargs(model, example_kwargs)
    cuts = _split_points(model, split_points, state.world_size)
    micro_args, micro_kwargs = _first_microbatch((example_args, inputs), n_microbatches)
    tensors = _model_tensors(model.eval())
    if checkpoint is None and any(t.value.is_meta for t in tensors):
        raise ValueError("the model has weights on the meta device (built under empty_weights()?): pass "
                         "checkpoint= so that each rank loads its own stage's weights")
    fake = FakeTensorMode()
    fake_args, fake_kwargs = tree_map_only(torch.Tensor, lambda t: _fake(fake, t, state.device),
                                           (micro_args, micro_kwargs))
    with _all_fake(tensors, fake, state.device), _bound_kwargs(model, constants):
        with fake, torch.no_grad():  # the output's structure, to give the runner's output its type
            output_spec = tree_flatten(model(*fake_args, **fake_kwargs))[1]
        with _restoring_forwards(model, cuts), warnings.catch_warnings():
            # torch deep-copies a weight used by several stages (a tied head): of a fake, a fake,
            # with a warning about its data pointer that says nothing about this use.
            warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
            pipe = trace_pipeline(model, fake_args, fake_kwargs,
                                  split_spec={name: SplitPoint.BEGINNING for name in cuts})
    _check_first_stage_takes(pipe.get_stage_module(0), inputs)
    stage = pipe.get_stage_module(state.rank)
    if checkpoint is not None:
        reader = _open_checkpoint(checkpoint)
        _load_stage(stage, tensors, reader, model_names(model, reader.shapes, key_map), state.device)
    else:
        _share_stage(stage, tensors, state.device)
    _check_all_real(stage)
    schedule = ScheduleGPipe(pipe.build_stage(state.rank, state.device), n_microbatches=n_microbatches)
    return PipelineRunner(state, schedule, (example_args, inputs), constants, output_spec, broadcast)


class PipelineRunner:
    """One rank's stage of a pipelined model. Call it on every rank with whole batches.

    The first rank's inputs are the ones used (other ranks may pass the same or nothing: pass
    them, and a wrongly shaped batch is refused on every rank instead of hanging the others).
    Returns the model's output, in the model's own output type, on the last rank (on every rank
    when built with `broadcast=True`), None elsewhere.
    """

    def __init__(self, state: RunState, schedule: PipelineScheduleSingle, example: tuple[tuple, dict],
                 constants: dict[str, Any], output_spec: TreeSpec, broadcast: bool) -> None:
        self._schedule = schedule
        self._device = state.device
        self._rank, self._last = state.rank, state.world_size - 1
        self._broadcast = broadcast
        self._constants = constants
        self._output_spec = output_spec
        self._signature = _signature(example)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inputs = self._inputs(kwargs)
        given = bool(args or inputs)
        if given and _signature((args, inputs)) != self._signature:
            raise ValueError(f"this pipeline was traced for inputs {self._signature}, got "
                             f"{_signature((args, inputs))}: torch.export fixes the shapes and the "
                             "keyword inputs, so build a pipeline for each input shape")
        with torch.no_grad():
            if self._rank == 0:
                if not given:
                    raise ValueError("rank 0 runs the first stage: it must pass the inputs")
                args, inputs = _to_device((args, inputs), self._device)
                output = self._schedule.step(*args, **inputs)
            else:
                output = self._schedule.step()
        if self._broadcast:
            output = _broadcast_tree(output, self._last, self._rank, self._device)
        elif self._rank != self._last:
            return None
        return _restore_type(output, self._output_spec)

    def _inputs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The tensor keyword inputs; the fixed ones may be repeated, with the traced value only."""
        for name, value in kwargs.items():
            if name in self._constants and value != self._constants[name]:
                raise ValueError(f"this pipeline was traced with {name}={self._constants[name]!r}, got "
                                 f"{name}={value!r}: build a pipeline with example_kwargs={{{name!r}: {value!r}}}")
        return {name: value for name, value in kwargs.items() if name not in self._constants}


def _split_kwargs(model: nn.Module, example_kwargs: Mapping[str, Any] | None) -> tuple[dict, dict]:
    """(tensor inputs, fixed values) of the keyword examples; `use_cache=False` where the forward takes it."""
    kwargs = dict(example_kwargs or {})
    inputs = {name: value for name, value in kwargs.items() if isinstance(value, torch.Tensor)}
    constants = {name: value for name, value in kwargs.items() if name not in inputs}
    if "use_cache" not in kwargs and "use_cache" in inspect.signature(model.forward).parameters:
        constants["use_cache"] = False
    return inputs, constants


def _check_first_stage_takes(first_stage: nn.Module, inputs: Mapping[str, torch.Tensor]) -> None:
    """torch's pipelining feeds the inputs to the first stage only, which keeps the keyword names
    only when it takes every input: refuse keyword inputs it cannot take, naming them."""
    takes = inspect.signature(first_stage.forward).parameters
    unused = [name for name in inputs if name not in takes]
    if unused:
        raise ValueError(f"keyword input(s) {unused} are not used by the first pipeline stage: "
                         "torch.distributed.pipelining gives the inputs to the first stage only, so every "
                         "input must be used before the first split point (or left out)")


def _restore_type(output: Any, spec: TreeSpec) -> Any:
    """The schedule's output (a tensor, or a tuple of the output's leaves) in the model's output type."""
    leaves = list(output) if isinstance(output, (tuple, list)) else [output]
    if len(leaves) != spec.num_leaves or not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
        return output  # not the flat leaves of the traced output: hand it over as it is
    return tree_unflatten(leaves, spec)


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


def _first_microbatch(example: tuple[tuple, dict], n_microbatches: int) -> tuple[tuple, dict]:
    leaves = [leaf for leaf in tree_flatten(example)[0] if isinstance(leaf, torch.Tensor)]
    sizes = {leaf.shape[0] for leaf in leaves if leaf.dim()}
    if len(sizes) != 1:
        raise ValueError("example_args and example_kwargs need tensors with one batch size along dim 0 "
                         f"(got sizes {sorted(sizes)})")
    batch = sizes.pop()
    if n_microbatches < 1 or batch % n_microbatches:
        raise ValueError(f"the batch of {batch} does not split into n_microbatches={n_microbatches} equal "
                         "micro-batches: pick a divisor of the batch size")
    return tree_map_only(torch.Tensor, lambda tensor: tensor[: batch // n_microbatches], example)


def _signature(example: tuple[tuple, dict]) -> str:
    """`int64[4, 6], attention_mask=int64[4, 6]`: what a call's inputs are, for comparing calls."""
    args, kwargs = example
    described = [_describe(leaf) for leaf in tree_flatten(args)[0]]
    described += [f"{name}={', '.join(_describe(leaf) for leaf in tree_flatten(value)[0])}"
                  for name, value in sorted(kwargs.items())]
    return ", ".join(described) or "no inputs"


def _describe(leaf: Any) -> str:
    return f"{str(leaf.dtype).removeprefix('torch.')}{list(leaf.shape)}" if isinstance(leaf, torch.Tensor) else repr(leaf)


def _fake(mode: FakeTensorMode, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A fake tensor (no data) shaped like `tensor`, on `device`."""
    with mode:
        return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=device)


@contextlib.contextmanager
def _all_fake(tensors: list[_ModelTensor], mode: FakeTensorMode, device: torch.device) -> Iterator[None]:
    """Swap every tensor of the model for a fake one on `device` while tracing, then put them back.

    Tracing on fakes costs no memory; on `device`, every device the model computes from its
    tensors (`x.device`) is the one the stage runs on, so the traced graph holds no stand-in's.
    """
    held = [(tensor, tensor.value) for tensor in tensors]
    for tensor, value in held:
        tensor.put(_fake(mode, value, device))
    try:
        yield
    finally:
        for tensor, value in held:
            tensor.set(value)


@contextlib.contextmanager
def _bound_kwargs(model: nn.Module, constants: dict[str, Any]) -> Iterator[None]:
    """Fix the non-tensor keyword inputs while tracing: export then sees only the tensor inputs,
    and the first stage keeps the model's keyword names (torch keeps them when the counts agree)."""
    if not constants:
        yield
        return
    model.forward = functools.partial(type(model).forward, model, **constants)
    try:
        yield
    finally:
        model.__dict__.pop("forward", None)


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
                reader: _SafetensorsCheckpoint | _MappingCheckpoint, names: Mapping[str, str],
                device: torch.device) -> None:
    """Load a traced stage's tensors (fakes, named as in the model) from the checkpoint."""
    origin = {name: tensor for tensor in model_tensors for name in tensor.names}
    tensors = _model_tensors(stage)
    for tensor in tensors:
        source = origin.get(tensor.names[0])
        if source is not None:
            tensor.aliases = source.names  # a tied weight may be saved under its other name
            tensor.initial = source.initial  # the real value a buffer was built with
        else:
            tensor.initial = None  # a fake: not a value to keep
    _find_keys(tensors, reader, names)
    _load(tensors, reader, device, dtype=None)


def _share_stage(stage: nn.Module, model_tensors: list[_ModelTensor], device: torch.device) -> None:
    """Give a traced stage's tensors (fakes) the model's own, on `device` (moved, not copied, if there)."""
    origin = {name: tensor for tensor in model_tensors for name in tensor.names}
    for tensor in _model_tensors(stage):
        source = origin.get(tensor.names[0])
        if source is None:
            raise ValueError(f"the traced stage holds {tensor.names[0]!r}, which is not a tensor of the model")
        tensor.put(source.value.to(device))


def _check_all_real(stage: nn.Module) -> None:
    """Refuse a stage still holding a fake tensor: a constant its forward creates from Python data
    (`torch.tensor([...])`), which tracing on fake tensors recorded without a value."""
    for module_name, module in stage.named_modules():
        held = {**vars(module), **module._parameters, **module._buffers}
        for attr, value in held.items():
            if isinstance(value, FakeTensor):
                name = f"{module_name}.{attr}" if module_name else attr
                raise ValueError(f"pipeline traced a tensor without a value in {name!r}: a tensor the forward "
                                 "creates from Python data cannot be traced on fake tensors; create it in "
                                 "__init__ as a buffer (register_buffer) instead")


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
