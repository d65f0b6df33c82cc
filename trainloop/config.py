"""The run's settings: one frozen record whose fields document themselves.

Each setting is declared once, with its default, its parser, its checks and its help text
(`trainloop.settings.setting`): the run's own here, and those one strategy owns in a record
beside its code, nested here (`config.ddp`: `DDPOptions`, `config.fsdp`: `FSDPOptions`,
`config.mesh`: `MeshOptions`). Users see them flat (`SETTINGS`): `init(ddp_bucket_cap_mb=50)`,
`--ddp-bucket-cap-mb 50`, `TRAINLOOP_DDP_BUCKET_CAP_MB=50`, `config.ddp_bucket_cap_mb`. `init`
validates keyword arguments against them, the `TRAINLOOP_*` variables that
`python -m trainloop.spawn --precision bf16 ...` sets are parsed by each setting's own parser,
and spawn's `--help` is generated from them. A bad value raises `SettingError` naming it.

Precedence: a `TRAINLOOP_*` variable (a spawn flag) > an `init(...)` argument > the default.
The command line wins so that a script can be run differently without editing it; when it
overrides an explicit argument, `init` warns once per job (on rank 0), naming both values.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from trainloop.errors import SettingError
from trainloop.precision import POLICIES
from trainloop.settings import (
    Settings,
    at_least,
    at_most,
    boolean,
    integer,
    is_boolean,
    is_integer,
    name_of,
    number,
    one_of,
    setting,
    text,
    to_float,
)
from trainloop.strategies.ddp import DDPOptions
from trainloop.strategies.fsdp import FSDPOptions
from trainloop.strategies.mesh import TP_STYLES, MeshOptions  # noqa: F401 (TP_STYLES: its old home)

PRECISIONS = tuple(policy.name for policy in POLICIES)
STRATEGIES = ("auto", "ddp", "fsdp")
ENV_PREFIX = "TRAINLOOP_"
#: Old names of settings, accepted with the same meaning (docs use the new one).
ALIASES = {"fsdp_blocks": "blocks"}


def _optional_device(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    import torch

    try:
        torch.device(value)
    except (RuntimeError, TypeError) as error:
        raise SettingError(
            "device", f"device must be a device string such as 'cpu', 'cuda' or 'cuda:1' (got {value!r})"
        ) from error


def _class_names(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or (value and not all(n.strip().isidentifier() for n in value.split(","))):
        name = name_of(instance, attribute)
        raise SettingError(name, f"{name} must be comma-separated class names such as 'Block' or "
                                 f"'Block,Head' (got {value!r})")


def _compile_choice(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, bool) and value != "blocks":
        raise SettingError("compile", f"compile must be True, False or 'blocks' (got {value!r})")


def _record(cls: type) -> Any:
    """A field of `Config` that holds one strategy's record of settings."""
    return attrs.field(factory=cls, validator=attrs.validators.instance_of(cls), metadata={"record": cls})


def _parse_compile(name: str, value: str) -> bool | str:
    return "blocks" if value.strip().lower() == "blocks" else boolean(name, value)


COMPILE_OPTIONS = ("backend", "fullgraph", "mode", "dynamic")


def _compile_options_json(value: Any) -> Any:
    """compile_options given as text (a spawn flag, a variable) is JSON."""
    if not isinstance(value, str):
        return value
    import json

    try:
        return json.loads(value) if value.strip() else None
    except json.JSONDecodeError as error:
        raise SettingError("compile_options", "compile_options must be a JSON object such as "
                           f"'{{\"backend\": \"aot_eager\"}}' (got {value!r}: {error})") from None


def _parse_compile_options(name: str, value: str) -> Any:
    return _compile_options_json(value)


def _optional_compile_options(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise SettingError("compile_options", f"compile_options must be a dict of torch.compile options (got {value!r})")
    unknown = sorted(set(value) - set(COMPILE_OPTIONS))
    if unknown:
        raise SettingError("compile_options", f"compile_options has unknown option(s) {unknown}; the options "
                           f"are {', '.join(COMPILE_OPTIONS)} (torch.compile's own)")
    if not instance.compile:
        raise SettingError("compile_options", "compile_options are given, but compile is False: set "
                           "compile=True or compile='blocks', or leave compile_options out")


def _is_float8_config(value: Any) -> bool:
    """A torchao `Float8LinearConfig`, known by its type (torchao is imported only where fp8 runs)."""
    return type(value).__name__ == "Float8LinearConfig" and type(value).__module__.startswith("torchao.")


def _fp8_recipe(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    from trainloop.precision import FLOAT8_RECIPES

    if not (value in FLOAT8_RECIPES or _is_float8_config(value)):
        raise SettingError("fp8_recipe", f"fp8_recipe must be one of {', '.join(map(repr, FLOAT8_RECIPES))} or a "
                           f"torchao.float8.Float8LinearConfig (got {value!r})")
    if value != "tensorwise" and instance.precision != "fp8":
        raise SettingError("fp8_recipe", f"fp8_recipe is set, but precision is {instance.precision!r}: set "
                           "precision='fp8', or leave fp8_recipe out")
    if _is_float8_config(value) and getattr(value, "enable_fsdp_float8_all_gather", False) and instance.strategy != "fsdp":
        raise SettingError("fp8_recipe", "fp8_recipe's Float8LinearConfig has enable_fsdp_float8_all_gather=True, "
                           f"which only FSDP2 uses, but strategy is {instance.strategy!r}: set strategy='fsdp', "
                           "or enable_fsdp_float8_all_gather=False")


def _fp8_filter(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    names = isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))
    if not (names or callable(value)):
        raise SettingError("fp8_filter", "fp8_filter must be comma-separated module names such as 'output,router' "
                           f"(a list of them), or a callable (module, name) -> bool (got {value!r})")
    if (callable(value) or value) and instance.precision != "fp8":
        raise SettingError("fp8_filter", f"fp8_filter is set, but precision is {instance.precision!r}: set "
                           "precision='fp8', or leave fp8_filter out")


def _fp8_all_gather(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not value:
        return
    if instance.precision != "fp8":
        raise SettingError("fp8_all_gather", f"fp8_all_gather=True needs precision='fp8' (got precision="
                           f"{instance.precision!r})")
    if instance.strategy != "fsdp":
        raise SettingError("fp8_all_gather", "fp8_all_gather=True is FSDP2's float8 all-gather, but strategy is "
                           f"{instance.strategy!r}: set strategy='fsdp', or leave fp8_all_gather out")
    if _is_float8_config(instance.fp8_recipe):
        raise SettingError("fp8_all_gather", "fp8_all_gather=True with fp8_recipe given as a Float8LinearConfig: "
                           "set enable_fsdp_float8_all_gather=True in that config instead")
    if instance.fp8_recipe != "tensorwise":
        raise SettingError("fp8_all_gather", f"fp8_all_gather=True with fp8_recipe={instance.fp8_recipe!r}: torchao "
                           "gathers float8 weights with tensorwise scales only. Use fp8_recipe='tensorwise', or "
                           "leave fp8_all_gather out (the weights are then gathered in bf16)")


@attrs.frozen(init=False)
class Config(Settings):
    """The settings of a run. Every setting is a keyword of `tl.init` and a `--flag` of spawn.

    `Config(accumulate=4, ddp_bucket_cap_mb=50)` takes the flat names, as `init` does (or a
    strategy's record whole: `Config(ddp=DDPOptions(bucket_cap_mb=50))`). A strategy's settings
    are read from its record (`config.ddp.bucket_cap_mb`) or by their flat name
    (`config.ddp_bucket_cap_mb`). Raises SettingError naming a bad value.
    """

    precision: str = setting(
        "fp32", parse=text, check=[one_of(PRECISIONS)],
        help="numerics: fp32, bf16 (autocast), fp16 (autocast + loss scaling), bf16-true, "
             "fp16-true, fp64-true (parameters in that dtype), fp8 (torchao float8 training)")
    fp8_recipe: Any = setting(
        "tensorwise", parse=text, check=[_fp8_recipe],
        help="precision='fp8': torchao's float8 recipe: 'tensorwise' (one scale per tensor, the fastest, "
             "the one fp8_all_gather takes) or 'rowwise' (a scale per row, more accurate); or, given to "
             "init, a torchao.float8.Float8LinearConfig used as it is")
    fp8_filter: Any = setting(
        "", parse=text, check=[_fp8_filter],
        help="precision='fp8': the nn.Linear layers left in bf16: comma-separated fragments of module "
             "names (a layer whose name contains one stays bf16, e.g. 'output,router'), or, given to init, "
             "a callable (module, name) -> bool (True: float8). Layers whose dimensions are not multiples "
             "of 16 always stay bf16")
    fp8_all_gather: bool = setting(
        False, parse=boolean, check=[is_boolean, _fp8_all_gather],
        help="precision='fp8' with strategy='fsdp': FSDP2 gathers the float8 layers' weights in float8 "
             "(torchao's enable_fsdp_float8_all_gather: half the bytes of bf16); tensorwise recipe only")
    accumulate: int = setting(
        1, parse=integer, check=[is_integer, at_least(1)],
        help="micro-batches per optimizer step (gradient accumulation window)")
    strategy: str = setting(
        "auto", parse=text, check=[one_of(STRATEGIES)],
        help="how models are wrapped over many processes: auto (DDP when world_size > 1), ddp, "
             "fsdp (FSDP2 fully_shard)")
    seed: int = setting(
        # torch.manual_seed takes up to 2**64 - 1, and trainloop seeds `seed + rank` and
        # `seed + epoch`: a bound far below that keeps every derived seed valid.
        0, parse=integer, check=[is_integer, at_least(0), at_most(2**63 - 1, "2**63 - 1")],
        help="base seed: process RNGs get seed + rank, shuffling seed + epoch")
    log_every: int = setting(
        10, parse=integer, check=[is_integer, at_least(1)],
        help="optimizer steps between metric flushes to the trackers")
    compile: bool | str = setting(
        False, parse=_parse_compile, check=[_compile_choice],
        help="torch.compile: False, True (the whole model), or 'blocks' (each block on its own: "
             "regional compilation, a fraction of the compile time)")
    compile_options: dict[str, Any] | None = setting(
        None, parse=_parse_compile_options, convert=_compile_options_json, check=[_optional_compile_options],
        help="compile: torch.compile's own options, any of backend, fullgraph, mode, dynamic (JSON, "
             "e.g. '{\"mode\": \"max-autotune\"}') (default: none: torch's defaults, inductor)")
    timeout: float = setting(
        600.0, parse=number, convert=to_float, check=[at_least(1)],
        help="seconds a collective may wait for the other ranks before failing")
    device: str | None = setting(
        None, parse=text, check=[_optional_device],
        help="device override (default: the accelerator torch finds, else cpu)")
    blocks: str = setting(
        "", parse=text, check=[_class_names],
        help="comma-separated names of the module classes that are the model's blocks (e.g. "
             "TransformerBlock), under every strategy: what fsdp shards one by one, and what "
             "activation_checkpointing and compile='blocks' wrap; empty: the classes the model "
             "names in _no_split_modules, else the children of its largest nn.ModuleList "
             "(old name: fsdp_blocks)")
    fsdp: FSDPOptions = _record(FSDPOptions)
    even_batches: bool = setting(
        True, parse=boolean, check=[is_boolean],
        help="pad the last global batch by wrapping around so every rank gets a batch of the same "
             "size (the repeated samples are trained on; gather(loader=) drops them); false: split "
             "it unevenly, a rank may get an empty batch, and with num_items training equals the "
             "big batch exactly")
    activation_checkpointing: str = setting(
        "none", parse=text, check=[one_of(("none", "blocks", "selective"))],
        help="'blocks': recompute each block's activations in backward instead of keeping them "
             "(torch's checkpoint_wrapper on the blocks `blocks` names, before sharding); less "
             "memory, about one more forward of compute. 'selective': op-level, torchtitan's "
             "default: keep the matmul and attention outputs (all but every second matmul), "
             "recompute the rest")
    activation_checkpointing_every: int = setting(
        1, parse=integer, check=[is_integer, at_least(1)],
        help="activation_checkpointing: checkpoint every k-th block only (1: every block; 2: "
             "blocks 0, 2, 4, ...: torchtitan's per-layer selective AC)")
    ddp: DDPOptions = _record(DDPOptions)
    mesh: MeshOptions = _record(MeshOptions)

    def __init__(self, **settings: Any) -> None:
        self.__attrs_init__(**_nested(settings))

    def __getattr__(self, name: str) -> Any:
        # Only reached when `name` is no field: a strategy's setting by its flat name, an old name.
        found = _BY_NAME.get(canonical(name))
        if found is None or (found.name == name and found.record is None):
            raise AttributeError(f"'Config' object has no attribute {name!r}")
        return found.value(self)

    def to_dict(self) -> dict[str, Any]:
        """Every setting by its flat name (JSON-ready plain values; mappings copied)."""
        return {s.name: _copied(s.value(self)) for s in SETTINGS}


def _copied(value: Any) -> Any:
    if isinstance(value, dict):
        return dict(value)
    if callable(value) or _is_float8_config(value):  # fp8_filter's callable, fp8_recipe's torchao config
        return repr(value)
    return value


@attrs.frozen
class Setting:
    """One setting as users see it: its flat name, where `Config` keeps it, its default, parser, help."""

    name: str
    #: The `Config` field of the strategy's record that holds it (None: a field of `Config` itself).
    record: str | None
    #: Its field in that record (or in `Config`).
    attribute: str
    default: Any
    help: str
    parse: Callable[[str, str], Any]

    def value(self, config: Config) -> Any:
        holder = config if self.record is None else getattr(config, self.record)
        return getattr(holder, self.attribute)


def _flatten() -> tuple[Setting, ...]:
    found = []
    for field in attrs.fields(Config):
        record = field.metadata.get("record")
        if record is None:
            found.append(Setting(field.name, None, field.name, field.default,
                                 field.metadata["help"], field.metadata["parse"]))
            continue
        for inner in attrs.fields(record):
            found.append(Setting(record.prefix + inner.name, field.name, inner.name, inner.default,
                                 inner.metadata["help"], inner.metadata["parse"]))
    return tuple(found)


SETTINGS: tuple[Setting, ...] = _flatten()
_BY_NAME = {s.name: s for s in SETTINGS}
_RECORDS = {field.name: field.metadata["record"] for field in attrs.fields(Config) if "record" in field.metadata}
_SETTING_NAMES = frozenset(_BY_NAME)


def canonical(name: str) -> str:
    """The setting's name for `name`, which may be an old one (`fsdp_blocks` -> `blocks`)."""
    return ALIASES.get(name, name)


def _nested(settings: Mapping[str, Any]) -> dict[str, Any]:
    """`Config`'s fields for flat `settings`: a strategy's settings gathered into its record."""
    fields: dict[str, Any] = {}
    records: dict[str, dict[str, Any]] = {}
    for given, value in settings.items():
        name = canonical(given)
        if name != given and name in settings:
            raise TypeError(f"{given} is the old name of {name}: give {name} only")
        found = _BY_NAME.get(name)
        if found is not None and found.record is not None:
            records.setdefault(found.record, {})[found.attribute] = value
        else:  # Config's own setting, a whole record, or unknown (attrs raises TypeError)
            fields[name] = value
    for record, values in records.items():
        if record in fields:
            raise TypeError(f"Config got {record}= and {sorted(_RECORDS[record].prefix + n for n in values)}: "
                            f"give the record or its settings, not both")
        fields[record] = _RECORDS[record](**values)
    return fields


def env_name(setting: str) -> str:
    """The environment variable that carries `setting` from spawn to `init`."""
    return ENV_PREFIX + setting.upper()


def parse_setting(name: str, value: str) -> Any:
    """Parse the text of a `TRAINLOOP_*` variable or a command-line flag with the setting's parser."""
    name = canonical(name)
    return _BY_NAME[name].parse(name, value)


def settings_from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings given as `TRAINLOOP_*` variables. Unknown names and bad values raise."""
    found: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = canonical(key[len(ENV_PREFIX):].lower())
        if name not in _SETTING_NAMES:
            known = ", ".join(env_name(n) for n in sorted(_SETTING_NAMES))
            raise ValueError(f"unknown environment variable {key}; trainloop reads {known}")
        if name in found:
            raise ValueError(f"{key} and {env_name(name)} both set {name} ({key} is its old name): unset one")
        try:
            found[name] = parse_setting(name, value)
        except SettingError as error:
            raise SettingError(name, f"{key}: {error}") from None
    return found


def resolve_config(arguments: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> Config:
    """Build the `Config` from `init`'s keyword arguments and the environment (which wins)."""
    unknown = {name for name in arguments if canonical(name) not in _SETTING_NAMES}
    if unknown:
        raise TypeError(
            f"init() got unknown setting(s) {sorted(unknown)}; settings are {sorted(_SETTING_NAMES)}"
        )
    for old, name in ALIASES.items():
        if old in arguments and name in arguments:
            raise TypeError(f"init() got {name} and its old name {old}: give {name} only")
    arguments = {canonical(name): value for name, value in arguments.items()}
    from_env = settings_from_env(environ)
    # Every rank reads the same variables: the job's main process alone says so, once per job.
    main_process = environ.get("RANK", environ.get("SLURM_PROCID", "0")) == "0"
    for name, value in from_env.items():
        if main_process and name in arguments and arguments[name] != value:
            warnings.warn(
                f"{env_name(name)}={value!r} overrides init({name}={arguments[name]!r})",
                stacklevel=3,
            )
    return config_from(arguments, from_env)


def config_from(arguments: Mapping[str, Any], from_env: Mapping[str, Any]) -> Config:
    """The `Config` of `arguments` overridden by `from_env`; an error in the latter names the variable."""
    try:
        return Config(**{**arguments, **from_env})
    except SettingError as error:
        if error.setting in from_env:
            raise SettingError(error.setting, f"{env_name(error.setting)}: {error}") from None
        raise
