"""The run's settings: one frozen record whose fields document themselves.

Each setting is declared once, here, with its default, its allowed values and its help text.
`init` validates keyword arguments against it, the `TRAINLOOP_*` environment variables that
`python -m trainloop.spawn --precision bf16 ...` sets are parsed from it, and spawn's `--help`
is generated from it.

Precedence: a `TRAINLOOP_*` variable (a spawn flag) > an `init(...)` argument > the default.
The command line wins so that a script can be run differently without editing it; when it
overrides an explicit argument, `init` warns once, naming both values.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import attrs

PRECISIONS = ("fp32", "bf16", "fp16", "bf16-true", "fp8")
STRATEGIES = ("auto", "ddp", "fsdp")
ENV_PREFIX = "TRAINLOOP_"


def _one_of(allowed: tuple[str, ...]):
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise ValueError(f"{attribute.name} must be one of {choices} (got {value!r})")

    return check


def _at_least(minimum: float):
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
            raise ValueError(f"{attribute.name} must be a number >= {minimum} (got {value!r})")

    return check


def _at_most(maximum: int, shown: str):
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value > maximum:
            raise ValueError(f"{attribute.name} must be at most {shown} (got {value!r})")

    return check


def _seconds(value: Any) -> Any:
    """A number of seconds as a float; anything else is left for the validator to refuse."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _integer(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{attribute.name} must be an integer (got {value!r})")


def _boolean(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{attribute.name} must be True or False (got {value!r})")


def _optional_device(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    import torch

    try:
        torch.device(value)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device must be a device string such as 'cpu', 'cuda' or 'cuda:1' (got {value!r})"
        ) from error


def _class_names(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or (value and not all(n.strip().isidentifier() for n in value.split(","))):
        raise ValueError(
            f"{attribute.name} must be comma-separated class names such as 'Block' or "
            f"'Block,Head' (got {value!r})"
        )


def _compile_choice(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, bool) and value != "blocks":
        raise ValueError(f"compile must be True, False or 'blocks' (got {value!r})")


# -- meshes ------------------------------------------------------------------------------------

# Tensor-parallel styles, in Hugging Face's vocabulary (`base_model_tp_plan`); trainloop.strategies.tensor_parallel
# maps each to torch's ParallelStyle.
TP_STYLES = ("colwise", "rowwise", "sequence_parallel", "colwise_rep", "colwise_gather_output",
             "rowwise_rep", "embedding_rowwise", "replicate")


def _minus_one_or_at_least_one(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value != -1 and value < 1:
        raise ValueError(f"{attribute.name} must be -1 (what is left) or an integer >= 1 (got {value!r})")


def _json_object(value: Any) -> Any:
    """A setting given as text (a `TRAINLOOP_*` variable, a spawn flag) is JSON: parse it."""
    if not isinstance(value, str):
        return value
    import json

    try:
        return json.loads(value) if value.strip() else None
    except json.JSONDecodeError as error:
        raise ValueError(f"tp_plan must be a JSON object such as "
                         f'\'{{"blocks.*.up": "colwise"}}\' (got {value!r}: {error})') from None


def _optional_tp_plan(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"tp_plan must be a dict of module-name pattern -> style (got {value!r})")
    unknown = {pattern: style for pattern, style in value.items() if style not in TP_STYLES}
    if unknown:
        raise ValueError(f"tp_plan has unknown style(s) {unknown}; the styles are {', '.join(TP_STYLES)}")


COMPILE_OPTIONS = ("backend", "fullgraph", "mode", "dynamic")


def _compile_options_json(value: Any) -> Any:
    """compile_options given as text (a spawn flag) is JSON."""
    if not isinstance(value, str):
        return value
    import json

    try:
        return json.loads(value) if value.strip() else None
    except json.JSONDecodeError as error:
        raise ValueError(f"compile_options must be a JSON object such as '{{\"backend\": \"aot_eager\"}}' "
                         f"(got {value!r}: {error})") from None


def _optional_compile_options(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise ValueError(f"compile_options must be a dict of torch.compile options (got {value!r})")
    unknown = sorted(set(value) - set(COMPILE_OPTIONS))
    if unknown:
        raise ValueError(f"compile_options has unknown option(s) {unknown}; the options are "
                         f"{', '.join(COMPILE_OPTIONS)} (torch.compile's own)")
    if not instance.compile:
        raise ValueError("compile_options are given, but compile is False: set compile=True or "
                         "compile='blocks', or leave compile_options out")


@attrs.frozen
class Config:
    """The settings of a run. Every field is a keyword of `tl.init` and a `--flag` of spawn."""

    precision: str = attrs.field(
        default="fp32",
        validator=_one_of(PRECISIONS),
        metadata={"help": "numerics: fp32, bf16 (autocast), fp16 (autocast + loss scaling), "
                          "bf16-true (bf16 parameters), fp8 (torchao float8 training)"},
    )
    accumulate: int = attrs.field(
        default=1,
        validator=[_integer, _at_least(1)],
        metadata={"help": "micro-batches per optimizer step (gradient accumulation window)"},
    )
    strategy: str = attrs.field(
        default="auto",
        validator=_one_of(STRATEGIES),
        metadata={"help": "how models are wrapped over many processes: auto (DDP when "
                          "world_size > 1), ddp, fsdp (FSDP2 fully_shard)"},
    )
    seed: int = attrs.field(
        default=0,
        # torch.manual_seed takes up to 2**64 - 1, and trainloop seeds `seed + rank` and
        # `seed + epoch`: a bound far below that keeps every derived seed valid.
        validator=[_integer, _at_least(0), _at_most(2**63 - 1, "2**63 - 1")],
        metadata={"help": "base seed: process RNGs get seed + rank, shuffling seed + epoch"},
    )
    log_every: int = attrs.field(
        default=10,
        validator=[_integer, _at_least(1)],
        metadata={"help": "optimizer steps between metric flushes to the trackers"},
    )
    compile: bool | str = attrs.field(
        default=False,
        validator=_compile_choice,
        metadata={"help": "torch.compile: False, True (the whole model), or 'blocks' (each block "
                          "on its own: regional compilation, a fraction of the compile time)"},
    )
    timeout: float = attrs.field(
        default=600.0,
        converter=_seconds,
        validator=_at_least(1),
        metadata={"help": "seconds a collective may wait for the other ranks before failing"},
    )
    device: str | None = attrs.field(
        default=None,
        validator=_optional_device,
        metadata={"help": "device override (default: the accelerator torch finds, else cpu)"},
    )
    fsdp_blocks: str = attrs.field(
        default="",
        validator=_class_names,
        metadata={"help": "strategy fsdp: comma-separated names of the module classes to shard one "
                          "by one (e.g. TransformerBlock); empty: the children of the model's "
                          "largest nn.ModuleList"},
    )
    fsdp_reshard_after_forward: bool = attrs.field(
        default=True,
        validator=_boolean,
        metadata={"help": "strategy fsdp: free each block's gathered parameters after its forward "
                          "and gather them again for backward (less memory, more communication)"},
    )
    fsdp_shard_ends: bool = attrs.field(
        default=True,
        validator=_boolean,
        metadata={"help": "strategy fsdp: shard the modules before the blocks (the embedding) and "
                          "after them (the final norm and the output head) as two units of their own, "
                          "as torchtitan does, instead of keeping them gathered in the root for the "
                          "whole step; the head's unit is not resharded after forward"},
    )
    fsdp_cpu_offload: bool = attrs.field(
        default=False,
        validator=_boolean,
        metadata={"help": "strategy fsdp: keep the sharded parameters, gradients and optimizer "
                          "state in CPU memory; the optimizer steps on the CPU"},
    )
    # Uneven data (issue 12): how the last, partial global batch is split across ranks.
    even_batches: bool = attrs.field(
        default=True,
        validator=_boolean,
        metadata={"help": "pad the last global batch by wrapping around so every rank gets a batch "
                          "of the same size (the repeated samples are trained on; gather(loader=) "
                          "drops them); false: split it unevenly, a rank may get an empty batch, "
                          "and with num_items training equals the big batch exactly"},
    )

    # -- strategies (issue 13) and DDP's own options (issue 12, item 17) ----------------------
    activation_checkpointing: str = attrs.field(
        default="none",
        validator=_one_of(("none", "blocks", "selective")),
        metadata={"help": "'blocks': recompute each block's activations in backward instead of "
                          "keeping them (torch's checkpoint_wrapper on the blocks fsdp_blocks "
                          "names, before sharding); less memory, about one more forward of compute. "
                          "'selective': op-level, torchtitan's default: keep the matmul and "
                          "attention outputs (all but every second matmul), recompute the rest"},
    )
    activation_checkpointing_every: int = attrs.field(
        default=1,
        validator=[_integer, _at_least(1)],
        metadata={"help": "activation_checkpointing: checkpoint every k-th block only (1: every "
                          "block; 2: blocks 0, 2, 4, ...: torchtitan's per-layer selective AC)"},
    )
    ddp_find_unused_parameters: bool = attrs.field(
        default=False,
        validator=_boolean,
        metadata={"help": "DDP: let backward finish when some parameters got no gradient this step. "
                          "Trap: a parameter used on only some ranks is averaged with zeros from the "
                          "others (a gradient of 1.0 becomes 0.5 on 2 ranks); costs a graph walk "
                          "per backward"},
    )
    ddp_static_graph: bool = attrs.field(
        default=False,
        validator=_boolean,
        metadata={"help": "DDP: the set of used parameters and the graph never change between "
                          "steps (allows reentrant activation checkpointing). Traps: a model whose "
                          "control flow does change gets wrong or missing gradient syncs; torch's "
                          "DDP breaks with it under no_sync, so it is refused with accumulate > 1"},
    )
    ddp_gradient_as_bucket_view: bool = attrs.field(
        default=False,
        validator=_boolean,
        metadata={"help": "DDP: gradients are views into the all-reduce buckets (saves one copy "
                          "of the gradients). Trap: code that calls grad.detach_() or replaces "
                          "a view in place fails or writes into the bucket"},
    )
    ddp_bucket_cap_mb: float = attrs.field(
        default=25.0,
        converter=_seconds,  # an int becomes a float; anything else is refused by name below
        validator=_at_least(0.001),
        metadata={"help": "DDP: megabytes of gradients per all-reduce bucket (25: torch's default, "
                          "with a small first bucket). Trap: tiny buckets mean many small "
                          "collectives, huge ones no overlap of the all-reduce with backward"},
    )
    ddp_comm_hook: str = attrs.field(
        default="none",
        validator=_one_of(("none", "bf16", "fp16")),
        metadata={"help": "DDP: all-reduce gradients compressed to bf16 or fp16 (torch's "
                          "default_hooks; bf16 needs nccl). Traps: the sum is rounded, so training "
                          "is no longer exact; fp16 overflows for gradients above 65504 x world_size"},
    )

    # -- meshes: data-parallel replication x sharding x tensor parallelism (trainloop.strategies.mesh) --
    dp_replicate: int = attrs.field(
        default=1,
        validator=[_integer, _at_least(1)],
        metadata={"help": "mesh: data-parallel replicas (strategy fsdp: > 1 is HSDP, the model "
                          "sharded within each replica and replicated across them)"},
    )
    dp_shard: int = attrs.field(
        default=-1,
        validator=[_integer, _minus_one_or_at_least_one],
        metadata={"help": "mesh: ranks each replica's model is sharded over (-1: the world size "
                          "divided by dp_replicate and tp); dp_replicate x dp_shard x tp = world size"},
    )
    tp: int = attrs.field(
        default=1,
        validator=[_integer, _at_least(1)],
        metadata={"help": "mesh: tensor-parallel ranks (the innermost mesh dimension: neighbouring "
                          "ranks, one machine); they see the same batches"},
    )
    tp_plan: dict[str, str] | None = attrs.field(
        default=None,
        converter=_json_object,
        validator=_optional_tp_plan,
        metadata={"help": "tp > 1: module-name patterns -> 'colwise' | 'rowwise' | "
                          "'sequence_parallel' (JSON, e.g. '{\"blocks.*.up\": \"colwise\"}') "
                          "(default: none: a Hugging Face model's own base_model_tp_plan)"},
    )

    compile_options: dict[str, Any] | None = attrs.field(
        default=None,
        converter=_compile_options_json,
        validator=_optional_compile_options,
        metadata={"help": "compile: torch.compile's own options, any of backend, fullgraph, mode, "
                          "dynamic (JSON, e.g. '{\"mode\": \"max-autotune\"}') (default: none: "
                          "torch's defaults, inductor)"},
    )

    def __attrs_post_init__(self) -> None:
        # Every float setting, whoever declares it: NaN passes any `>=` check and inf is no
        # real bound (a NaN timeout crashed the workers), so neither is a value at all.
        for field in attrs.fields(type(self)):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{field.name} must be a finite number (got {value!r})")

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


SETTINGS: tuple[attrs.Attribute, ...] = attrs.fields(Config)
_SETTING_NAMES = frozenset(a.name for a in SETTINGS)


def env_name(setting: str) -> str:
    """The environment variable that carries `setting` from spawn to `init`."""
    return ENV_PREFIX + setting.upper()


def parse_setting(name: str, text: str) -> Any:
    """Parse the text of a `TRAINLOOP_*` variable or a command-line flag into the setting's type."""
    kind = attrs.fields_dict(Config)[name].default
    if isinstance(kind, bool):
        lowered = text.strip().lower()
        if name == "compile" and lowered == "blocks":
            return "blocks"
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} must be true or false (got {text!r})")
    if isinstance(kind, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{name} must be an integer (got {text!r})") from None
    if isinstance(kind, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{name} must be a number (got {text!r})") from None
    return text


def settings_from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings given as `TRAINLOOP_*` variables. Unknown names and bad values raise."""
    found: dict[str, Any] = {}
    for key, text in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in _SETTING_NAMES:
            known = ", ".join(env_name(n) for n in sorted(_SETTING_NAMES))
            raise ValueError(f"unknown environment variable {key}; trainloop reads {known}")
        try:
            found[name] = parse_setting(name, text)
        except ValueError as error:
            raise ValueError(f"{key}: {error}") from None
    return found


def resolve_config(arguments: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> Config:
    """Build the `Config` from `init`'s keyword arguments and the environment (which wins)."""
    unknown = set(arguments) - _SETTING_NAMES
    if unknown:
        raise TypeError(
            f"init() got unknown setting(s) {sorted(unknown)}; settings are {sorted(_SETTING_NAMES)}"
        )
    from_env = settings_from_env(environ)
    for name, value in from_env.items():
        if name in arguments and arguments[name] != value:
            warnings.warn(
                f"{env_name(name)}={value!r} overrides init({name}={arguments[name]!r})",
                stacklevel=3,
            )
    return config_from(arguments, from_env)


def config_from(arguments: Mapping[str, Any], from_env: Mapping[str, Any]) -> Config:
    """The `Config` of `arguments` overridden by `from_env`; an error in the latter names the variable."""
    try:
        return Config(**{**arguments, **from_env})
    except ValueError as error:
        name = str(error).split(" ", 1)[0]
        if name in from_env:
            raise ValueError(f"{env_name(name)}: {error}") from None
        raise
