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
overrides an explicit argument, `init` warns once, naming both values.
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
        help="numerics: fp32, bf16 (autocast), fp16 (autocast + loss scaling), bf16-true (bf16 "
             "parameters), fp8 (torchao float8 training)")
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
        "none", parse=text, check=[one_of(("none", "blocks"))],
        help="'blocks': recompute each block's activations in backward instead of keeping them "
             "(torch's checkpoint_wrapper on the blocks `blocks` names, before sharding); less "
             "memory, about one more forward of compute")
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
    return dict(value) if isinstance(value, dict) else value


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
    except SettingError as error:
        if error.setting in from_env:
            raise SettingError(error.setting, f"{env_name(error.setting)}: {error}") from None
        raise
