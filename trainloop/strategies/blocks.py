"""A model's blocks (a transformer's layers), and what is done to each: checkpoint, compile.

FSDP2 shards block by block; `activation_checkpointing="blocks"` wraps each block in torch's
`checkpoint_wrapper` (its activations are recomputed in backward instead of kept); and
`compile="blocks"` compiles each block on its own (regional compilation: the blocks of a
transformer share one compiled graph, so compiling takes a fraction of whole-model compile).
The blocks are the same for all three: `find_blocks`.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from trainloop.models.hf import declared_no_split

if TYPE_CHECKING:
    from trainloop.config import Config


def find_blocks(model: nn.Module, class_names: str = "") -> list[nn.Module]:
    """The model's blocks: what `fully_shard`, activation checkpointing and compile="blocks" wrap.

    Innermost first.

    `class_names` ("Block" or "Block,Head"): every submodule of those classes. Empty: those the
    model declares in `_no_split_modules` (Hugging Face's convention: its decoder layers), else the
    children that hold parameters of the model's largest `nn.ModuleList` or `nn.ModuleDict` (by
    parameter count; torchtitan keeps its layers in a ModuleDict), and none (a warning: the root
    alone is sharded, and gathered whole) when it has neither.
    Raises ValueError naming the classes the model does not contain.
    """
    if class_names:
        wanted = {name.strip() for name in class_names.split(",")}
        found = [m for m in model.modules() if m is not model and type(m).__name__ in wanted]
        missing = wanted - {type(m).__name__ for m in found}
        if missing:
            present = sorted({type(m).__name__ for m in model.modules()})
            raise ValueError(
                f"blocks names {sorted(missing)}, but {type(model).__name__} has no submodule "
                f"of that class; its module classes are {present}"
            )
        return found[::-1]  # modules() is pre-order: reversed, inner blocks come before outer ones
    declared = set(declared_no_split(model))  # a Hugging Face model names its blocks itself
    found = [m for m in model.modules() if m is not model and type(m).__name__ in declared]
    if found:
        return found[::-1]
    containers = [m for m in model.modules() if isinstance(m, (nn.ModuleList, nn.ModuleDict))]
    largest = max(containers, key=_parameter_count, default=None)
    if largest is None or _parameter_count(largest) == 0:
        warnings.warn(
            f"strategy='fsdp' found no blocks in {type(model).__name__} (no nn.ModuleList or "
            "nn.ModuleDict holding parameters): only the root is sharded, so forward and backward "
            "gather the whole model at once. Name the block classes with init(blocks='MyBlock') "
            "to shard per block.",
            UserWarning, stacklevel=2)
        return []
    # children(), not iteration: iterating a ModuleDict yields its keys.
    return [child for child in largest.children() if _parameter_count(child) > 0]


def _parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def apply(model: nn.Module, config: Config, *, warn: bool = False) -> list[nn.Module]:
    """What the settings ask of the blocks, in torchtitan's order: checkpoint, then compile.

    Strategies call it on the user's module (tensor-parallel already, not yet sharded or
    wrapped). Returns the blocks as they now sit in the model, each its outermost layer (the
    compiled checkpoint wrapper around a block, or the block): what FSDP shards one by one.
    `warn`: let `find_blocks` warn when there are none (FSDP would gather the whole model).
    """
    with warnings.catch_warnings():
        if not warn:
            warnings.simplefilter("ignore")  # only FSDP needs blocks; AC and compile refuse below
        found = find_blocks(model, config.blocks)
    checkpointing = config.activation_checkpointing
    if checkpointing != "none":
        found = checkpoint_blocks(model, config.blocks, selective=checkpointing == "selective",
                                  every=getattr(config, "activation_checkpointing_every", 1), blocks=found)
    if config.compile == "blocks":
        compile_blocks(model, config.blocks, blocks=found, **dict(getattr(config, "compile_options", None) or {}))
    return found


def checkpoint_blocks(model: nn.Module, class_names: str = "", *, selective: bool = False, every: int = 1,
                      blocks: list[nn.Module] | None = None) -> list[nn.Module]:
    """Wrap blocks in torch's (non-reentrant) `checkpoint_wrapper`, in place; return the blocks.

    Forward then keeps only each block's inputs; backward recomputes the block's activations
    (with the RNG state of the forward, so dropout draws the same mask) and the gradients are
    those of the model without checkpointing. State dict keys do not change.

    `every`: wrap every `every`-th block only (1: all; torchtitan's per-layer selective AC).
    `selective`: op-level selective checkpointing (torchtitan's default): the outputs of the
    matmuls (but every second `mm`), of attention and of reduce-scatters are kept, the cheap
    element-wise ops recomputed (`SAVED_OPS`, `selective_policy`).

    Returns the blocks with each checkpointed one replaced by its wrapper (the module that now
    sits in the block's parent). Raises ValueError for a model without blocks (nothing would be
    checkpointed).
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if blocks is None:
        blocks = find_blocks(model, class_names)
    setting = "activation_checkpointing='selective'" if selective else "activation_checkpointing='blocks'"
    _refuse_without_blocks(model, blocks, setting)
    parents = {id(child): (parent, name) for parent in model.modules() for name, child in parent.named_children()}
    options = {"context_fn": selective_contexts} if selective else {}
    placed = []
    for index, block in enumerate(blocks):
        if index % every:
            placed.append(block)
            continue
        wrapper = checkpoint_wrapper(block, **options)
        parent, name = parents[id(block)]
        setattr(parent, name, wrapper)  # a ModuleList's or ModuleDict's entry "3" too
        parents[id(wrapper)] = (parent, name)
        placed.append(wrapper)
    return placed


def compile_blocks(model: nn.Module, class_names: str = "", *, blocks: list[nn.Module] | None = None,
                   **options: object) -> nn.Module:
    """`torch.compile` each block in place (`module.compile(**options)`); return `model`.

    `blocks` (from `checkpoint_blocks`): compile those, the checkpoint wrappers included, as
    torchtitan does; compiling the block inside its wrapper breaks backward on Hugging Face's
    models. The rest of the model runs eagerly. In place, so parameter names and state dict keys
    stay those of the model (`torch.compile(block)` would insert `_orig_mod.`). `options` are
    `torch.compile`'s (`backend`, `fullgraph`, `mode`, ...). Raises ValueError for a model
    without blocks.
    """
    if blocks is None:
        blocks = find_blocks(model, class_names)
    _refuse_without_blocks(model, blocks, "compile='blocks'")
    for block in blocks:
        block.compile(**options)
    _plain_outputs_before_compiled_blocks(model, blocks)
    return model


def _plain_outputs_before_compiled_blocks(model: nn.Module, blocks: list[nn.Module]) -> None:
    """Hand compiled blocks plain tensors, never torch's lazy `AsyncCollectiveTensor`.

    A tensor-parallel module outside the blocks (an "embedding_rowwise" embedding) returns its
    all-reduced output as an AsyncCollectiveTensor. Given one as its input, a compiled block's
    backward loses the path back to that module: its gradient is exactly zero under FSDP2, or
    DTensor's backward raises (pytorch/pytorch, raw `parallelize_module` + compile does the same).
    A copy made eagerly (`clone`, which waits for the collective) is an ordinary autograd tensor.
    """
    from torch.distributed.tensor import DTensor

    inside = {id(m) for block in blocks for m in block.modules()}
    order = list(model.modules())
    last = max(i for i, m in enumerate(order) if id(m) in inside)
    # Only modules up to the last block can feed one (not the head: its logits need no copy).
    producers = [m for m in order[:last] if id(m) not in inside
                 and any(isinstance(p, DTensor) for p in m.parameters(recurse=False))]
    for module in producers:
        module.register_forward_hook(_plain_output)


def _plain_output(module: nn.Module, args: object, output: object) -> object:
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return output.clone() if isinstance(output, AsyncCollectiveTensor) else output


def _saved_ops() -> set:
    """The ops whose outputs op-level selective checkpointing keeps: torchtitan's `_save_list`,
    with the CPU's attention kernel and `addmm` (the matmul of a Linear with a bias)."""
    ops = torch.ops.aten
    names = ("mm", "addmm", "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention")
    saved = {getattr(ops, name).default for name in names if hasattr(ops, name)}
    saved.add(torch.ops._c10d_functional.reduce_scatter_tensor.default)
    return saved


def selective_contexts():
    """A fresh pair of contexts per checkpointed call, counting its matmuls (see `selective_policy`)."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(selective_policy({}))


def selective_policy(counts: dict):
    """torchtitan's op policy: keep the outputs of `_saved_ops()`, but recompute every second `mm`.

    Keeping every matmul output would keep nearly all of a block's activations; recomputing every
    second one halves what the matmuls keep for the cost of half of their forward.
    """
    from torch.utils.checkpoint import CheckpointPolicy

    saved, mm = _saved_ops(), torch.ops.aten.mm.default

    def policy(ctx, func, *args, **kwargs):
        key = "recompute" if ctx.is_recompute else "forward"
        if func is mm:
            counts[key] = counts.get(key, 0) + 1
        keep = func in saved and not (func is mm and counts[key] % 2 == 0)
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _refuse_without_blocks(model: nn.Module, blocks: list[nn.Module], setting: str) -> None:
    if not blocks:
        raise ValueError(
            f"{setting} found no blocks in {type(model).__name__} (no nn.ModuleList or nn.ModuleDict "
            "holding parameters): name the block classes with init(blocks='MyBlock')"
        )
