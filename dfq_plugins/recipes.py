"""TOML recipes: the same keys as the CLI flags, so files and flags share one schema."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def load_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"recipe {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"recipe {path} is not valid TOML: {exc}") from exc


def parse_value(text: str) -> Any:
    """A TOML scalar (``100``, ``0.5``, ``true``, ``"adam"``); bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(source_configs: dict[str, dict[str, Any]], assignments: list[str]) -> None:
    """``zeroq.iterations=100`` -> source_configs["zeroq"]["iterations"] = 100."""
    for item in assignments:
        key, sep, value = item.partition("=")
        source, dot, field = key.partition(".")
        if not sep or not dot or not field:
            raise ValueError(f"--set expects SOURCE.KEY=VALUE (e.g. zeroq.iterations=100), got {item!r}")
        target = source_configs.setdefault(source.strip(), {})
        *parents, leaf = [part.strip() for part in field.split(".")]
        for parent in parents:  # diffdfq.base.iterations=100 -> {"base": {"iterations": 100}}
            node = target.get(parent)
            if isinstance(node, str):  # base = "intraq" given as a bare name
                node = {"name": node}
            target[parent] = node = dict(node or {})
            target = node
        target[leaf] = parse_value(value.strip())


def split_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]
