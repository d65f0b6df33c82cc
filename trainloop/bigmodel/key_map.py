"""Which checkpoint key holds which of the model's tensors: `key_map=`, and the base-model prefix.

A checkpoint's keys are turned into the model's names in two steps, as `transformers`'
`from_pretrained` does:

1. `key_map`, if given: a callable `checkpoint key -> model name` (None skips the key), or a
   dict of regular expressions to replacements (`{r"^decoder\\.": "model."}`), tried in order,
   the first that matches a key renaming it (`re.subn`): `from_pretrained(key_mapping=)`'s form.
2. The base-model prefix of a Hugging Face model (its `base_model_prefix`, such as
   "transformer" or "model"): a checkpoint saved from the base model (`GPT2Model`: keys
   `h.0.attn...`) loads into the model with a head (`GPT2LMHeadModel`: `transformer.h.0.attn...`)
   and the other way round. It applies only when the model has that prefix and no checkpoint
   key does, or the reverse, so a checkpoint that already matches is never renamed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

from torch import nn

KeyMap = Callable[[str], "str | None"] | Mapping[str, str]


def model_names(model: nn.Module, checkpoint_keys: Iterable[str], key_map: KeyMap | None = None) -> dict[str, str]:
    """`{name in the model: checkpoint key}` for every checkpoint key that maps to a name.

    Raises TypeError for a `key_map` that is neither a callable nor a dict of strings,
    ValueError for a bad regular expression or for two checkpoint keys mapped to one name.
    """
    rename = _renamer(key_map)
    names: dict[str, str] = {}
    for key in checkpoint_keys:
        name = rename(key)
        if name is None:
            continue
        if not isinstance(name, str):
            raise TypeError(f"key_map({key!r}) returned {name!r}: return the model's name for the key, or None "
                            "to skip it")
        if name in names:
            raise ValueError(f"key_map maps two checkpoint keys to {name!r}: {names[name]!r} and {key!r}")
        names[name] = key
    return _with_base_prefix(model, names)


def _renamer(key_map: KeyMap | None) -> Callable[[str], str | None]:
    if key_map is None:
        return lambda key: key
    if isinstance(key_map, Mapping):
        try:
            patterns = [(re.compile(pattern), replacement) for pattern, replacement in key_map.items()]
        except (re.error, TypeError) as error:
            raise ValueError(f"key_map must map regular expressions to replacements (strings): {error}") from error

        def rename(key: str) -> str:
            for pattern, replacement in patterns:
                renamed, count = pattern.subn(replacement, key)
                if count:
                    return renamed
            return key

        return rename
    if callable(key_map):
        return key_map
    raise TypeError(f"key_map must be a callable (checkpoint key -> model name) or a dict of regular "
                    f"expressions to replacements (got {type(key_map).__name__})")


def _with_base_prefix(model: nn.Module, names: dict[str, str]) -> dict[str, str]:
    """Add or strip a Hugging Face model's `base_model_prefix` when only one side has it."""
    prefix = getattr(model, "base_model_prefix", "")
    if not isinstance(prefix, str) or not prefix:
        return names
    dotted = f"{prefix}."
    model_has_it = prefix in dict(model.named_children())
    checkpoint_has_it = any(name.startswith(dotted) for name in names)
    if model_has_it and not checkpoint_has_it:  # a base model's checkpoint, a model with a head
        return _unique({f"{dotted}{name}": key for name, key in names.items()}, names)
    if checkpoint_has_it and not model_has_it:  # a checkpoint with a head, the base model
        return _unique({name.removeprefix(dotted): key for name, key in names.items()}, names)
    return names


def _unique(renamed: dict[str, str], before: dict[str, str]) -> dict[str, str]:
    if len(renamed) != len(before):
        raise ValueError("two checkpoint keys name the same tensor once the base-model prefix is added or "
                         "removed: pass key_map= to say which key is which")
    return renamed

