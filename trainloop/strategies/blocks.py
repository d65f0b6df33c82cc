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

from torch import nn

from trainloop.models.hf import declared_no_split

if TYPE_CHECKING:
    from trainloop.config import Config


def find_blocks(model: nn.Module, class_names: str = "") -> list[nn.Module]:
    """The model's blocks: what `fully_shard`, activation checkpointing and compile="blocks" wrap.

    Innermost first.

    `class_names` ("Block" or "Block,Head"): every submodule of those classes. Empty: those the
    model declares in `_no_split_modules` (Hugging Face's convention: its decoder layers), else the
    children that hold parameters of the model's largest `nn.ModuleList` (by parameter count),
    and none (a warning: the root alone is sharded, and gathered whole) when it has none.
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
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    largest = max(lists, key=_parameter_count, default=None)
    if largest is None or _parameter_count(largest) == 0:
        warnings.warn(
            f"strategy='fsdp' found no blocks in {type(model).__name__} (no nn.ModuleList holding "
            "parameters): only the root is sharded, so forward and backward gather the whole model "
            "at once. Name the block classes with init(blocks='MyBlock') to shard per block.",
            UserWarning, stacklevel=2)
        return []
    return [child for child in largest if _parameter_count(child) > 0]


def _parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def apply(model: nn.Module, config: Config) -> None:
    """What the settings ask of the blocks, in torchtitan's order: checkpoint, then compile.

    Strategies call it on the user's module before they shard or wrap it.
    """
    if config.activation_checkpointing == "blocks":
        checkpoint_blocks(model, config.blocks)
    if config.compile == "blocks":
        compile_blocks(model, config.blocks)


def checkpoint_blocks(model: nn.Module, class_names: str = "") -> nn.Module:
    """Wrap each block in torch's (non-reentrant) `checkpoint_wrapper`, in place; return `model`.

    Forward then keeps only each block's inputs; backward recomputes the block's activations
    (with the RNG state of the forward, so dropout draws the same mask) and the gradients are
    those of the model without checkpointing. State dict keys do not change. Raises ValueError
    for a model without blocks (nothing would be checkpointed).
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    blocks = _blocks_or_refuse(model, class_names, "activation_checkpointing='blocks'")
    chosen = {id(block) for block in blocks}
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper,
                                   check_fn=lambda module: id(module) in chosen)
    return model


def compile_blocks(model: nn.Module, class_names: str = "") -> nn.Module:
    """`torch.compile` each block in place (`module.compile()`); return `model`.

    The rest of the model runs eagerly. In place, so parameter names and state dict keys stay
    those of the model (`torch.compile(block)` would insert `_orig_mod.`). Raises ValueError
    for a model without blocks.
    """
    for block in _blocks_or_refuse(model, class_names, "compile='blocks'"):
        block.compile()
    return model


def _blocks_or_refuse(model: nn.Module, class_names: str, setting: str) -> list[nn.Module]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # find_blocks' FSDP warning: refused below instead
        blocks = find_blocks(model, class_names)
    if not blocks:
        raise ValueError(
            f"{setting} found no blocks in {type(model).__name__} (no nn.ModuleList holding "
            "parameters): name the block classes with init(blocks='MyBlock')"
        )
    return blocks
