"""The plugin contract: four register-callback hooks, one per kind of thing a plugin can add.

Each hook receives ``register(name, obj)``; a plugin calls it once per thing it contributes,
so one distribution can add several synthesizers, toolchains, models or distillers.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "dfq_plugins"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[..., None]


@hookspec
def dfq_register_synthesizers(register: Register) -> None:
    """Register data sources: ``register("zeroq", ZeroQSynthesizer)``.

    The registered object is a class (or factory) taking keyword config and exposing
    ``synthesize(teacher, num_samples, *, seed, batch_size, progress) -> CalibrationSet``.
    """


@hookspec
def dfq_register_distillers(register: Register) -> None:
    """Register training loops: ``register("kd", KDDistiller)``."""


@hookspec
def dfq_register_toolchains(register: Register) -> None:
    """Register quantization toolchains: ``register("nncf", NNCFToolchain)``.

    A toolchain exposes ``prepare(model, scheme, example_inputs, *, trainable)``,
    ``calibrate(prepared, calibration_set)`` and ``convert(prepared)``.
    """


@hookspec
def dfq_register_models(register: Register) -> None:
    """Register named models: ``register("cifar10-resnet20", ModelDef(...))``."""


HOOK_KINDS: dict[str, str] = {
    "synthesizers": "dfq_register_synthesizers",
    "distillers": "dfq_register_distillers",
    "toolchains": "dfq_register_toolchains",
    "models": "dfq_register_models",
}

__all__ = ["HOOK_KINDS", "PROJECT", "Any", "hookimpl", "hookspec"]
