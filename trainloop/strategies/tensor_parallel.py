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

import fnmatch
from collections.abc import Mapping

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from trainloop.strategies.mesh import TP_STYLES


def parallel_style(style: str) -> ParallelStyle | None:
    """torch's ParallelStyle for a Hugging Face style name; None for "replicate" (left whole).

    Raises ValueError for a name that is not one of `trainloop.strategies.mesh.TP_STYLES`.
    """
    if style == "colwise":
        return ColwiseParallel()
    if style == "rowwise":
        return RowwiseParallel()
    if style == "sequence_parallel":
        return _SequenceParallelOfWholeInput()
    if style in ("colwise_rep", "colwise_gather_output"):
        return ColwiseParallel(output_layouts=Replicate())
    if style in ("rowwise_rep", "embedding_rowwise"):
        return RowwiseParallel(input_layouts=Replicate())
    if style == "replicate":
        return None
    raise ValueError(f"unknown tensor-parallel style {style!r}; the styles are {', '.join(TP_STYLES)}")


class _SequenceParallelOfWholeInput(SequenceParallel):
    """SequenceParallel whose plain-tensor input is whole (the same on every rank): slice it."""

    @staticmethod
    def _prepare_input_fn(sequence_sharding, mod, inputs, device_mesh):
        first = inputs[0]
        if isinstance(first, torch.Tensor) and not isinstance(first, DTensor):
            # Replicate -> Shard is a local slice: no communication.
            first = DTensor.from_local(first, device_mesh, (Replicate(),), run_check=False)
        return SequenceParallel._prepare_input_fn(sequence_sharding, mod, (first, *inputs[1:]), device_mesh)


def apply_tp_plan(model: nn.Module, tp_mesh: DeviceMesh, plan: Mapping[str, str] | None = None) -> nn.Module:
    """Shard `model`'s modules over the 1-D `tp_mesh` as `plan` says, in place; return `model`.

    `plan` maps module-name patterns to styles (see the module docstring); None takes the
    Hugging Face model's own plan. A collective over `tp_mesh`: every rank of it calls this on
    the same model. Raises ValueError for a pattern that matches no module (listing what the
    model has), a module two patterns match, an unknown style, or no plan at all.
    """
    if plan is None:
        plan = hugging_face_plan(model)
    styles = {pattern: parallel_style(style) for pattern, style in plan.items()}  # checks every style first
    resolved: dict[str, ParallelStyle] = {}
    claimed: dict[str, str] = {}
    names = [name for name, _ in model.named_modules() if name]
    for pattern, style in styles.items():
        matched = matching_modules(names, pattern)
        if not matched:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ValueError(
                f"tp_plan pattern {pattern!r} matches no module of {type(model).__name__}; "
                f"its modules are {shown} ('*' stands for one dot-separated part, as in 'blocks.*.up')"
            )
        for name in matched:
            if name in claimed:
                raise ValueError(f"tp_plan patterns {claimed[name]!r} and {pattern!r} both match module "
                                 f"{name!r}; give each module one style")
            claimed[name] = pattern
            if style is not None:
                resolved[name] = style
    if resolved:
        parallelize_module(model, tp_mesh, resolved)
    return model


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
