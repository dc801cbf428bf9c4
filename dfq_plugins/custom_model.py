"""A user's own model on the command line: ``--model my_pkg.models:build`` or ``--model net.py:build``.

The factory is called with no arguments and returns an ``nn.Module`` (with ``--input-shape``,
``--mean``, ``--std``, ``--num-classes`` for its InputSpec) or a ``(module, InputSpec)`` pair.
A ``.py`` file is run as a module, as ``python net.py`` would run it: only point at code you trust.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from pathlib import Path
from typing import Any

from torch import nn

from .errors import ModelFactoryError
from .spec import InputSpec


def is_custom_model(name: str) -> bool:
    """``pkg.mod:factory`` or ``file.py:factory`` rather than a model plugin's name."""
    return ":" in name


def _numbers(text: str, what: str, kind: type = float) -> tuple:
    try:
        return tuple(kind(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--{what} takes comma-separated numbers, got {text!r}") from None


def spec_from_flags(flags: dict[str, Any]) -> InputSpec | None:
    """An InputSpec from ``--input-shape 3,32,32 --mean ... --std ... --num-classes 10``, or None."""
    given = {k: flags.get(k) for k in ("input_shape", "mean", "std", "num_classes")}
    if not any(v is not None for v in given.values()):
        return None
    missing = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is None]
    if missing:
        raise ValueError(f"an InputSpec from flags needs {', '.join(missing)} as well")
    pixel_range = _numbers(flags["pixel_range"], "pixel-range") if flags.get("pixel_range") else (0.0, 1.0)
    return InputSpec(shape=_numbers(given["input_shape"], "input-shape", int), mean=_numbers(given["mean"], "mean"),
                     std=_numbers(given["std"], "std"), num_classes=int(given["num_classes"]),
                     pixel_range=pixel_range)


def load_factory(target: str) -> Any:
    source, _, attr = target.rpartition(":")
    if not source or not attr:
        raise ValueError(f"--model {target!r}: use MODULE:FACTORY (my_pkg.models:build) or FILE.py:FACTORY")
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"--model {target!r}: no file {path}")
        spec = importlib.util.spec_from_file_location(f"dfq_user_model_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise _factory_error(target, "importing it", exc) from exc
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as exc:
            raise ValueError(f"--model {target!r}: cannot import {source!r} ({exc})") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise TypeError(f"--model {target!r}: {source} has no callable {attr!r}")
    return factory


def _factory_error(target: str, doing: str, exc: Exception) -> ModelFactoryError:
    """Name the user's line that raised: their code, not ours, is what they need to look at."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = (Path(__file__).resolve().parent, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve())
    own = [f for f in frames if not any(Path(f.filename).resolve().is_relative_to(root) for root in ours)]
    where = f" at {own[-1].filename}:{own[-1].lineno}" if own else ""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return ModelFactoryError(f"--model {target!r}: {doing} raised {type(exc).__name__}{where}: {message} "
                             "(rerun with --debug for the full traceback)")


def load_custom_model(target: str, flags: dict[str, Any]) -> tuple[nn.Module, InputSpec]:
    """Build the user's model and its InputSpec (the factory's, unless flags give one)."""
    factory = load_factory(target)
    try:
        made = factory()
    except Exception as exc:
        raise _factory_error(target, "calling it", exc) from exc
    model, spec = made if isinstance(made, tuple) else (made, None)
    if not isinstance(model, nn.Module):
        raise TypeError(f"--model {target!r} returned a {type(model).__name__}, not an nn.Module "
                        "(or a (module, InputSpec) pair)")
    spec = spec_from_flags(flags) or spec
    if spec is None:
        raise ValueError(f"--model {target!r} needs its input described: --input-shape C,H,W --mean ... --std ... "
                         "--num-classes N (or return (module, InputSpec) from the factory)")
    return model.eval(), spec


__all__ = ["is_custom_model", "load_custom_model", "spec_from_flags"]
