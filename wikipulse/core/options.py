"""The machinery of settings: fields that name their flag, environment variable, default, help and check, and the
base class that turns a dataclass of them into argparse flags, reads them (flag, then environment, then default)
and validates them. The fields themselves are declared once, by concern, in settings.py.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from itertools import count
from typing import Any, Self

from wikipulse.core.errors import SettingsError

_declared = count()  # the order settings are declared in, which `--help` keeps (a dataclass orders them by class)


def opt(
    env: str,
    help: str,
    default: Any,
    *,
    flag: str | None = None,
    choices: tuple[str, ...] | None = None,
    least: float | None = None,
    most: float | None = None,
    nonempty: bool = False,
    check: Callable[[Any], object] | None = None,
    method: str | None = None,
) -> Any:
    """A setting: its environment variable, help and default; `flag` (default --the-name), and its checks: `choices`,
    `least`/`most` (bounds), `nonempty`, `check` (a function of the value raising SettingsError) and `method` (the
    name of a method of the settings that raises SettingsError: checks that need other fields, run after the rest)."""
    meta = {"order": next(_declared), "env": env, "help": help, "flag": flag, "choices": choices, "least": least, "most": most}
    return field(default=default, metadata={**meta, "nonempty": nonempty, "check": check, "method": method})


def flag_of(f: Field[Any]) -> str:
    return str(f.metadata["flag"] or "--" + f.name.replace("_", "-"))


def declared(cls: type[Options] | Options) -> list[Field[Any]]:
    """The fields of a settings class in the order they are declared (settings.py reads top-down)."""
    return sorted(fields(cls), key=lambda f: int(f.metadata["order"]))


@dataclass(frozen=True)
class Options:
    """Base of every settings class: a frozen dataclass whose fields are all `opt(...)`."""

    @classmethod
    def flags(cls) -> list[str]:
        """The command-line flags of this class's fields, in order."""
        return [flag_of(f) for f in declared(cls)]

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field, its help naming the environment variable and the default."""
        for f in declared(cls):
            text = f"{f.metadata['help']} [env {f.metadata['env']}, default {f.default!r}]"
            if f.type in ("bool", bool):
                parser.add_argument(flag_of(f), dest=f.name, action="store_true", default=None, help=text)
            else:
                parser.add_argument(flag_of(f), dest=f.name, default=None, help=text, choices=f.metadata["choices"])

    @classmethod
    def from_args(cls, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """Flag, then environment, then default; values are converted to each field's type. Only this class's fields
        are read: another role's environment variables are not this one's business."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw: Any = overrides.get(f.name, getattr(args, f.name, None) if args is not None else None)
            if raw is None:
                raw = environ.get(f.metadata["env"])
            if raw is None:
                continue
            values[f.name] = _convert(f.name, raw, f.default if f.default is not MISSING else None)
        settings = cls(**values)
        settings.validate()
        return settings

    def to_env(self) -> dict[str, str]:
        """Every setting as its environment variable, to hand to child processes."""
        out = {}
        for f in declared(self):
            value = getattr(self, f.name)
            out[f.metadata["env"]] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        return out

    def validate(self) -> None:
        """Each field's own checks, then those that need other fields (SettingsError naming the field)."""
        for f in declared(self):
            _check_value(f.name, getattr(self, f.name), f.metadata)
        for f in declared(self):
            if f.metadata["method"]:
                getattr(self, f.metadata["method"])()


def _check_value(name: str, value: Any, meta: Mapping[str, Any]) -> None:
    allowed = meta["choices"]
    if allowed and value not in allowed:
        raise SettingsError(f"{name} must be one of {allowed}, not {value!r}")
    if meta["least"] is not None and value < meta["least"]:
        raise SettingsError(f"{name} must be at least {meta['least']}, not {value}")
    if meta["most"] is not None and value > meta["most"]:
        raise SettingsError(f"{name} must be at most {meta['most']}, not {value}")
    if meta["nonempty"] and not value.strip():
        raise SettingsError(f"{name} must not be empty")
    if meta["check"] is not None:
        meta["check"](value)


def _convert(name: str, raw: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise SettingsError(f"{name}: not a boolean: {raw!r}")
    if isinstance(default, (int, float)):
        try:
            return type(default)(raw)
        except ValueError:
            raise SettingsError(f"{name}: not a number: {raw!r}") from None
    return str(raw)
