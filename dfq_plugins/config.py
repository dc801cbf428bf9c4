"""One place that checks every plugin option before any work starts.

Options are declared once, as a plugin's dataclass fields (or its ``__init__`` parameters) with
type hints; pydantic validates each value against its declared type in lax mode, so strings from
``--set`` or a recipe are coerced the way a user means them (``false``, ``False``, ``no``, ``0``
are all false; ``"0.1"`` is 0.1) and a value that cannot be (``iterations = 2.7``) is an error
naming the option. Unknown options get a "did you mean".
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
import types
import typing
from typing import Any

from pydantic import TypeAdapter, ValidationError

from .errors import DFQError


class ConfigError(DFQError, ValueError):
    """An option that does not exist, or a value of the wrong type."""


def _did_you_mean(key: str, known: list[str]) -> str:
    hint = difflib.get_close_matches(key, known, n=1)
    return f"; did you mean {hint[0]!r}?" if hint else ""


@functools.cache
def declared_options(factory: Any) -> tuple[dict[str, Any], bool]:
    """(option name -> declared type or Any, whether extra keywords are accepted)."""
    if dataclasses.is_dataclass(factory):
        names = [f.name for f in dataclasses.fields(factory) if f.init and not f.name.startswith("_")]
        target, open_ended = factory, False
    else:
        target = factory.__init__ if inspect.isclass(factory) else factory
        try:
            params = list(inspect.signature(target).parameters.values())
        except (TypeError, ValueError):
            return {}, True
        names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]
        open_ended = any(p.kind == p.VAR_KEYWORD for p in params)
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - an annotation we cannot resolve: check names, not types
        hints = {}
    return {n: hints.get(n, Any) for n in names}, open_ended


@functools.cache
def _adapter(tp: Any) -> TypeAdapter:
    return TypeAdapter(tp)


def validate_options(factory: Any, config: dict[str, Any], what: str) -> dict[str, Any]:
    """``config`` checked against ``factory``'s declared options, values coerced to their types."""
    if not isinstance(config, dict):
        raise ConfigError(f"{what}: options must be a table of KEY = VALUE, got {type(config).__name__}")
    options, open_ended = declared_options(factory)
    out = {}
    for key, value in config.items():
        if key not in options:
            if open_ended:
                out[key] = value
                continue
            raise ConfigError(f"{what}: unknown option {key!r}{_did_you_mean(key, list(options))} "
                              f"Options: {', '.join(options) or '(none)'}")
        tp = options[key]
        if tp is Any:
            out[key] = value
            continue
        if isinstance(value, bool) and _is_number_type(tp):
            raise ConfigError(f"{what}: option {key!r} = {value!r}: a number is expected, not true/false "
                              f"(declared {_type_name(tp)})")
        try:
            checked = _adapter(tp).validate_python(value)
            # a value that already meant this (1 for a float option) stays as given: it is part of cache keys
            same = value == checked and (type(value) is type(checked) or (type(value) is int and type(checked) is float))
            out[key] = value if same else checked
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ConfigError(f"{what}: option {key!r} = {value!r}: {first['msg']} (declared {_type_name(tp)})") \
                from None
        except Exception:  # noqa: BLE001 - a type pydantic cannot check: pass it on unchecked
            out[key] = value
    return out


def _is_number_type(tp: Any) -> bool:
    """int or float, or an optional/union of them without bool (pydantic would read True as 1)."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return bool(args) and bool not in args and any(a in (int, float) for a in args)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_number(name: str, value: Any, *, minimum: int, kind: type = int) -> Any:
    """A top-level setting such as ``images`` or ``--steps``: of ``kind`` and at least ``minimum``."""
    try:
        out = _adapter(kind).validate_python(value)
    except ValidationError as exc:
        raise ConfigError(f"{name} = {value!r}: {exc.errors()[0]['msg']}") from None
    if out < minimum:
        raise ConfigError(f"{name} = {value!r}: must be at least {minimum}")
    return out


def check_keys(keys: dict[str, Any], allowed: list[str], where: str, elsewhere: dict[str, str] | None = None) -> None:
    """Refuse unknown keys of a recipe or section, naming the close one (or the command that reads it)."""
    for key in keys:
        if key in allowed:
            continue
        if elsewhere and key in elsewhere:
            raise ConfigError(f"{where}: {key!r} is not read here (it is a setting of {elsewhere[key]})")
        raise ConfigError(f"{where}: unknown key {key!r}{_did_you_mean(key, allowed)} Known: {', '.join(allowed)}")


# An option's valid range: (low, high, low included, high included); None is unbounded.
Bound = tuple[float | None, float | None, bool, bool]
POSITIVE: Bound = (0, None, False, False)
NON_NEGATIVE: Bound = (0, None, True, False)
AT_LEAST_ONE: Bound = (1, None, True, False)
UNIT: Bound = (0, 1, True, True)
UNIT_OPEN_ABOVE: Bound = (0, 1, True, False)


def _describe(bound: Bound) -> str:
    lo, hi, lo_in, hi_in = bound
    if hi is None:
        return f"{'>=' if lo_in else '>'} {lo:g}"
    return f"in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def check_declared(obj: Any, bounds: dict[str, Bound], choices: dict[str, tuple], what: str) -> None:
    """Every bounded option inside its range and every enumerated one among its choices, with a
    message that names the option as the user writes it (``kd.lr``): checked when a plugin is
    built, which the CLI and API do before any work."""
    for key, bound in bounds.items():
        value = getattr(obj, key, None)
        if value is None or isinstance(value, bool):
            continue
        lo, hi, lo_in, hi_in = bound
        bad = math.isnan(value)
        bad = bad or (lo is not None and (value < lo or (value == lo and not lo_in)))
        bad = bad or (hi is not None and (value > hi or (value == hi and not hi_in)))
        if bad:
            raise ConfigError(f"{what}.{key} = {value!r}: must be {_describe(bound)}")
    for key, allowed in choices.items():
        value = getattr(obj, key, None)
        if value is not None and value not in allowed:
            raise ConfigError(f"{what}.{key} = {value!r}: choose one of {', '.join(map(str, allowed))}")


__all__ = ["AT_LEAST_ONE", "NON_NEGATIVE", "POSITIVE", "UNIT", "UNIT_OPEN_ABOVE", "Bound", "ConfigError",
           "check_declared", "check_keys", "check_number", "declared_options", "validate_options"]
