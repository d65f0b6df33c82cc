"""Tensor parallelism from a plan of module-name patterns, in Hugging Face's vocabulary.

    apply_tp_plan(model, mesh.tp_mesh, {"blocks.*.up": "colwise", "blocks.*.down": "rowwise"})

Each pattern names modules as `fnmatch` does, one dot-separated segment at a time (`*` matches
one segment: "blocks.*.up" matches "blocks.3.up", not "blocks.3.inner.up"), and each style maps
to torch's own `ParallelStyle`, applied by `torch.distributed.tensor.parallel.parallelize_module`:

    "colwise"               ColwiseParallel(): the weight's output features are sharded; the
                            output stays sharded on its last dimension (feed it to a "rowwise").
    "rowwise"               RowwiseParallel(): the input features are sharded; the input is the
                            sharded output of a "colwise", the output is all-reduced (whole).
    "sequence_parallel"     torch's SequenceParallel for a norm: parameters replicated, computed on
                            this rank's slice of dimension 1 (the sequence) of its whole input;
                            the output stays a DTensor sharded on the sequence, so a following
                            "colwise" gathers it, and a plain module after it raises rather than
                            compute on a slice. (torch's and Hugging Face's own SequenceParallel
                            take a plain input to be this rank's slice already; here activations
                            between the plan's modules are whole, so the input is sliced.)
    "colwise_rep",          ColwiseParallel(output_layouts=Replicate()): the output is gathered
    "colwise_gather_output" (whole on every rank), as for a language model's head.
    "rowwise_rep",          RowwiseParallel(input_layouts=Replicate()): a whole input, sliced here
    "embedding_rowwise"     (an nn.Embedding's vocabulary rows are sharded this way).
    "replicate"             nothing: the module stays whole on every tensor-parallel rank.

Sequence parallelism between blocks (torchtitan's plan), trainloop's own style names: the
residual stream between the blocks is a DTensor sharded on the sequence (dimension 1), so each
rank holds and computes the norms and residual adds of its slice only:

    "embedding_rowwise_sequence"  RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)):
                            an embedding whose output is reduce-scattered onto the sequence.
    "rowwise_sequence"      RowwiseParallel(output_layouts=Shard(1)): a block's last matmul (wo, w2),
                            its output reduce-scattered onto the sequence instead of all-reduced.
    "gather_sequence"       PrepareModuleInput(Shard(1) -> Replicate()) for a block's attention or
                            feed-forward module: each sequence-sharded DTensor input (positional or
                            keyword) is all-gathered whole before the module runs.
    "sequence_parallel"     the norms (above): given the sharded stream, they compute on the slice.

These outputs stay DTensors (`use_local_output=False`, where torchtitan hands on local slices):
the model's own code between the planned modules then sees the whole shapes (a Hugging Face
model's positions come from `hidden_states.shape[1]`), and a plain tensor meeting the stream
raises instead of mixing a slice with a whole tensor. Every colwise style gathers a DTensor
input that is not whole (the final norm's output reaching the head) before its matmul.

Loss parallelism (`loss_parallel=True`): the plan's gathered head ("colwise_rep") becomes
ColwiseParallel(output_layouts=Shard(-1), use_local_output=False): its logits stay sharded over
the vocabulary, and `F.cross_entropy` computed inside `loss_parallel(state)` (torch's
`loss_parallel()`) reduces them without gathering them; `tl.backward` enters it itself.

Parameters are taken from the first rank of each tensor-parallel group (torch's default
`src_data_rank=0`), so the sharded model computes what that rank's whole model computes.
Tensor-parallel ranks must see the same inputs (trainloop's loaders shard by the
data-parallel rank only: trainloop.strategies.mesh).

Without a plan, a Hugging Face model's own is used: `config.base_model_tp_plan` (the keys are
relative to the base model, e.g. `LlamaForCausalLM.model`, so they are prefixed with the
model's `base_model_prefix` when the model holds its base model there), else `model._tp_plan`.

This module imports torch.distributed.tensor.parallel: import it only for tp > 1.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from trainloop.strategies.mesh import GATHERED_HEAD_STYLES, TP_STYLES

if TYPE_CHECKING:
    from trainloop.state import RunState

_SEQUENCE = Shard(1)  # the sequence dimension of (batch, sequence, features) activations
# The styles of sequence parallelism: their activations are sharded on the sequence.
SEQUENCE_STYLES = ("sequence_parallel", "rowwise_sequence", "embedding_rowwise_sequence", "gather_sequence")


def parallel_style(style: str, *, loss_parallel: bool = False) -> ParallelStyle | None:
    """torch's ParallelStyle for a style name (the module docstring); None for "replicate" (left whole).

    `loss_parallel`: the gathered head styles ("colwise_rep") keep their logits sharded on the
    last dimension, as a DTensor. Raises ValueError for a name that is not one of
    `trainloop.strategies.mesh.TP_STYLES`.
    """
    if style == "colwise":
        return ColwiseParallel()
    if style == "rowwise":
        return RowwiseParallel()
    if style == "sequence_parallel":
        return _SequenceParallelOfWholeInput()
    if style in GATHERED_HEAD_STYLES:
        if loss_parallel:
            return ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
        return ColwiseParallel(output_layouts=Replicate())
    if style in ("rowwise_rep", "embedding_rowwise"):
        return RowwiseParallel(input_layouts=Replicate())
    if style == "rowwise_sequence":
        return RowwiseParallel(output_layouts=_SEQUENCE, use_local_output=False)
    if style == "embedding_rowwise_sequence":
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=_SEQUENCE, use_local_output=False)
    if style == "gather_sequence":
        return _GatherSequence()
    if style == "replicate":
        return None
    raise ValueError(f"unknown tensor-parallel style {style!r}; the styles are {', '.join(TP_STYLES)}")


class _GatherSequence(ParallelStyle):
    """torch's PrepareModuleInput(input_layouts=Shard(1), desired_input_layouts=Replicate()), for
    every DTensor input sharded on the sequence, positional or keyword (a Hugging Face attention
    takes `hidden_states=`); other inputs (positions, masks) pass unchanged. The gathered input
    stays a (replicated) DTensor, so its gradient goes back by one reduce-scatter."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def whole(value: Any) -> Any:
            if isinstance(value, DTensor) and _SEQUENCE in value.placements:
                return value.redistribute(placements=[Replicate()] * value.device_mesh.ndim, async_op=True)
            return value

        def gather(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return tuple(whole(a) for a in args), {k: whole(v) for k, v in kwargs.items()}

        module.register_forward_pre_hook(gather, with_kwargs=True)
        return module


class _SequenceParallelOfWholeInput(SequenceParallel):
    """SequenceParallel whose plain-tensor input is whole (the same on every rank): slice it."""

    @staticmethod
    def _prepare_input_fn(sequence_sharding, mod, inputs, device_mesh):
        first = inputs[0]
        if isinstance(first, torch.Tensor) and not isinstance(first, DTensor):
            # Replicate -> Shard is a local slice: no communication.
            first = DTensor.from_local(first, device_mesh, (Replicate(),), run_check=False)
        return SequenceParallel._prepare_input_fn(sequence_sharding, mod, (first, *inputs[1:]), device_mesh)


def apply_tp_plan(model: nn.Module, tp_mesh: DeviceMesh, plan: Mapping[str, str] | None = None, *,
                  loss_parallel: bool = False) -> nn.Module:
    """Shard `model`'s modules over the 1-D `tp_mesh` as `plan` says, in place; return `model`.

    `plan` maps module-name patterns to styles (see the module docstring); None takes the
    Hugging Face model's own plan. `loss_parallel`: the plan's gathered head keeps its logits
    sharded (the module docstring). A collective over `tp_mesh`: every rank of it calls this on
    the same model. Raises ValueError for a pattern that matches no module (listing what the
    model has), a module two patterns match, an unknown style, a style the module's type does
    not take (a norm given "colwise"), no plan at all, a plan that shards nothing (empty, or
    all "replicate": tp > 1 would then run the whole model on every rank, silently),
    `loss_parallel` without exactly one gathered head, and precision='fp8' with sequence
    parallelism.
    """
    if plan is None:
        plan = hugging_face_plan(model)
    # Checks every style first.
    styles = {pattern: parallel_style(style, loss_parallel=loss_parallel) for pattern, style in plan.items()}
    resolved: dict[str, ParallelStyle] = {}
    claimed: dict[str, str] = {}
    modules = {name: module for name, module in model.named_modules() if name}
    names = list(modules)
    for pattern, style in styles.items():
        matched = matching_modules(names, pattern)
        if not matched:
            raise ValueError(
                f"tp_plan pattern {pattern!r} matches no module of {type(model).__name__}; "
                f"its modules are {_shown(names)} ('*' stands for one dot-separated part, as in 'blocks.*.up')"
            )
        for name in matched:
            if name in claimed:
                raise ValueError(f"tp_plan patterns {claimed[name]!r} and {pattern!r} both match module "
                                 f"{name!r}; give each module one style")
            claimed[name] = pattern
            _check_module_takes(modules[name], name, pattern, plan[pattern])
            if style is not None:
                resolved[name] = style
    if not resolved:
        given = f"{dict(plan)} shards no module" if plan else "is empty"
        raise ValueError(
            f"tp_plan {given}, so tp > 1 would run the whole of {type(model).__name__} on every "
            f"tensor-parallel rank: map module-name patterns to 'colwise' / 'rowwise' (its modules are "
            f"{_shown(names)}), or leave tp at 1"
        )
    if loss_parallel:
        _refuse_loss_parallel_without_one_head(model, claimed, plan)
    _refuse_float8_sequence_parallel(modules, claimed, plan)
    parallelize_module(model, tp_mesh, resolved)
    return model


def _refuse_loss_parallel_without_one_head(model: nn.Module, claimed: dict[str, str], plan: Mapping[str, str]) -> None:
    """loss_parallel=True needs one head whose logits it keeps sharded: the plan's gathered head."""
    heads = [name for name, pattern in claimed.items() if plan[pattern] in GATHERED_HEAD_STYLES]
    if len(heads) == 1:
        return
    styles = " or ".join(repr(s) for s in GATHERED_HEAD_STYLES)
    found = f"it gives {styles} to {heads}" if heads else f"no module of {type(model).__name__} has {styles}"
    raise ValueError(
        f"loss_parallel=True keeps the output head's logits sharded over the vocabulary, and the "
        f"head is the module tp_plan gives {styles}, but {found}: give exactly the output head "
        f"(nn.Linear) that style (e.g. {{'output': 'colwise_rep'}}), or leave loss_parallel off"
    )


def _refuse_float8_sequence_parallel(modules: dict[str, nn.Module], claimed: dict[str, str],
                                     plan: Mapping[str, str]) -> None:
    """precision='fp8' (torchao's Float8Linear) with sequence parallelism: refused up front.

    A sequence-sharded DTensor activation reaches the float8 cast of the next colwise layer,
    where torchao's float8 tensor does not implement `aten.index_select` (a crash in the first
    forward). torchao's own float8 parallel styles would be needed; until then, say so here.
    (Loss parallelism's sharded logits come out of the float8 head's matmul: that works.)
    """
    float8 = [name for name, module in modules.items() if type(module).__name__ == "Float8Linear"]
    if not float8:
        return
    sequence = [(name, plan[pattern]) for name, pattern in claimed.items() if plan[pattern] in SEQUENCE_STYLES]
    if sequence:
        name, style = sequence[0]
        raise ValueError(
            f"precision='fp8' with tp_plan's {style!r} style ({name!r}) is not supported: "
            "torchao's float8 layers fail on the sequence-sharded activations (aten.index_select). "
            "Use precision='bf16' with sequence parallelism, or drop the sequence-parallel entries "
            f"({', '.join(SEQUENCE_STYLES)}) (fp8 with colwise/rowwise tensor parallelism works)"
        )


# torch's ColwiseParallel and RowwiseParallel shard the weights of these types only.
_SHARDABLE = (nn.Linear, nn.Embedding)
_NORM_STYLES = ("sequence_parallel", "replicate")
_WHOLE_MODULE_STYLES = (*_NORM_STYLES, "gather_sequence")  # "gather_sequence": an attention, a feed-forward


def _check_module_takes(module: nn.Module, name: str, pattern: str, style: str) -> None:
    """Refuse a sharding style for a module whose weights torch cannot shard that way."""
    if style in _WHOLE_MODULE_STYLES or isinstance(module, _SHARDABLE):
        return
    raise ValueError(
        f"tp_plan pattern {pattern!r} gives {style!r} to {name!r}, a {type(module).__name__}: torch "
        f"shards only nn.Linear and nn.Embedding weights by column or row. A {type(module).__name__} "
        f"takes {' or '.join(repr(s) for s in _NORM_STYLES)}; name its Linear layers instead "
        f"(e.g. {name + '.*'!r})"
    )


def _shown(names: list[str]) -> str:
    return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")


def matching_modules(names: list[str], pattern: str) -> list[str]:
    """The names that `pattern` matches, segment by segment (as `parallelize_module` matches)."""
    parts = pattern.split(".")
    return [name for name in names
            if len(segments := name.split(".")) == len(parts)
            and all(fnmatch.fnmatchcase(segment, part) for segment, part in zip(segments, parts))]


def hugging_face_plan(model: nn.Module) -> dict[str, str]:
    """A Hugging Face model's own tensor-parallel plan, keyed by names within `model`.

    `model.config.base_model_tp_plan` (keys relative to the base model, prefixed with
    `base_model_prefix` when `model` holds its base model under that name), else
    `model._tp_plan`. Raises ValueError when the model has neither.
    """
    config = getattr(model, "config", None)
    base_plan = getattr(config, "base_model_tp_plan", None)
    if base_plan:
        prefix = getattr(model, "base_model_prefix", "")
        holds_base = bool(prefix) and isinstance(getattr(model, prefix, None), nn.Module)
        return {f"{prefix}.{key}" if holds_base else key: style for key, style in base_plan.items()}
    own_plan = getattr(model, "_tp_plan", None)
    if own_plan:
        return dict(own_plan)
    raise ValueError(
        f"tp > 1 needs a tensor-parallel plan, and {type(model).__name__} has none of its own (no "
        "config.base_model_tp_plan or _tp_plan, as Hugging Face models have): pass "
        "init(tp_plan={'blocks.*.up': 'colwise', 'blocks.*.down': 'rowwise'}) naming your modules"
    )


@contextlib.contextmanager
def loss_parallel(state: RunState | None = None) -> Iterator[None]:
    """Compute the cross-entropy of vocabulary-sharded logits in parallel: `tl.loss_parallel(state)`.

        with tl.accumulate(state, model), tl.loss_parallel(state):
            logits = model(inputs)                       # a DTensor, sharded on the vocabulary
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            state = tl.backward(state, loss)             # a DTensor too: backward as usual

    Under `loss_parallel=True` it enters torch's `loss_parallel()`; otherwise (tp=1, or the
    setting off) it does nothing, so one script runs at any mesh. Re-entrant (`tl.backward`
    enters it again around its backward, which torch's context needs as well), and the ops are
    restored when the block raises. The loss is a replicated DTensor; `tl.log` takes it as it is.
    `state=None` enters torch's context unconditionally.
    """
    if state is not None and not state.config.mesh.loss_parallel:
        yield
        return
    from torch.distributed.tensor.parallel.loss import (
        _disable_custom_loss_ops,
        _enable_custom_loss_ops,
        customized_loss_ops,
    )

    handlers = DTensor._op_dispatcher._custom_op_handlers
    if all(op in handlers for op in customized_loss_ops):  # already inside: leave it to the outer one
        yield
        return
    _enable_custom_loss_ops()
    try:
        yield
    finally:
        _disable_custom_loss_ops()
