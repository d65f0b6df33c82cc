"""How one setting is declared: its default, the parser that reads it from text, its checks, its help.

`trainloop.config.Config` and the records the strategies own beside their code (`DDPOptions`,
`FSDPOptions`, `MeshOptions`) declare each field with `setting(...)`. The parser reads the text
of a `TRAINLOOP_*` variable or a spawn flag (each field names its own: no type is guessed from
the default); the checks refuse a bad value with a `SettingError` that names the setting as
users write it: the record's `prefix` and the field (`ddp_` + `bucket_cap_mb`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import attrs

from trainloop.errors import SettingError

#: A parser: (the setting's name, its text) -> its value; raises SettingError.
Parser = Callable[[str, str], Any]


class Settings:
    """The base of a settings record: its fields' flat names, and no float that is not finite."""

    #: What a field's name is prefixed with in the flat names (`init` keywords, flags, variables).
    prefix: ClassVar[str] = ""

    def __attrs_post_init__(self) -> None:
        # Every float setting, whoever declares it: NaN passes any `>=` check and inf is no
        # real bound (a NaN timeout crashed the workers), so neither is a value at all.
        for field in attrs.fields(type(self)):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                name = self.prefix + field.name
                raise SettingError(name, f"{name} must be a finite number (got {value!r})")


def setting(default: Any, *, parse: Parser, help: str, check: Sequence[Callable] = (),
            convert: Callable[[Any], Any] | None = None) -> Any:
    """An attrs field for one setting: `parse` reads its text, `check`s validate, `help` is its --help."""
    return attrs.field(default=default, converter=convert, validator=list(check) or None,
                       metadata={"help": help, "parse": parse})


def name_of(instance: Any, attribute: attrs.Attribute) -> str:
    """The flat name of `attribute` of a settings record (what the user wrote)."""
    return type(instance).prefix + attribute.name


# -- parsers: text -> value ----------------------------------------------------------------------


def text(name: str, value: str) -> str:
    return value


def boolean(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SettingError(name, f"{name} must be true or false (got {value!r})")


def integer(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise SettingError(name, f"{name} must be an integer (got {value!r})") from None


def number(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise SettingError(name, f"{name} must be a number (got {value!r})") from None


# -- converters and checks: value -> value, or SettingError ------------------------------------


def to_float(value: Any) -> Any:
    """An int as a float; anything else is left for the checks to refuse."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def one_of(allowed: Sequence[str]) -> Callable:
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in allowed:
            name = name_of(instance, attribute)
            choices = ", ".join(repr(a) for a in allowed)
            raise SettingError(name, f"{name} must be one of {choices} (got {value!r})")

    return check


def at_least(minimum: float) -> Callable:
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
            name = name_of(instance, attribute)
            raise SettingError(name, f"{name} must be a number >= {minimum} (got {value!r})")

    return check


def at_most(maximum: int, shown: str) -> Callable:
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value > maximum:
            name = name_of(instance, attribute)
            raise SettingError(name, f"{name} must be at most {shown} (got {value!r})")

    return check


def is_integer(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        name = name_of(instance, attribute)
        raise SettingError(name, f"{name} must be an integer (got {value!r})")


def is_boolean(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, bool):
        name = name_of(instance, attribute)
        raise SettingError(name, f"{name} must be True or False (got {value!r})")
