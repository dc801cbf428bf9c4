"""The public verbs: synthesize a calibration set, quantize a model through a toolchain."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import plugins
from .data import CalibrationSet
from .io import cache_root, short_hash
from .scheme import QuantScheme
from .spec import InputSpec
from .teacher import Teacher, borrowed_teacher


def resolve_model(model: nn.Module | str, input_spec: InputSpec | None) -> tuple[nn.Module, InputSpec]:
    """A model name from the model plugins, or a module plus its (required) InputSpec."""
    if isinstance(model, str):
        model, spec = plugins.get("models", model).obj.load()
        return model, input_spec or spec
    if input_spec is None:
        raise ValueError("pass input_spec=InputSpec(shape=(C, H, W), mean=..., std=..., num_classes=...): the "
                         "input normalisation decides what synthetic images look like and cannot be guessed")
    return model, input_spec


def make_synthesizer(source: str | dict[str, Any], data: Any = None) -> Any:
    """``"zeroq"`` or ``{"name": "zeroq", "iterations": 100, ...}`` -> a configured synthesizer."""
    if isinstance(source, dict):
        config = dict(source)
        name = config.pop("name", None)
        if not name:
            raise ValueError(f"a source given as a table needs a 'name' key, got {sorted(source)}")
    else:
        name, config = source, {}
    if name == "real" and data is not None:
        config["data"] = data
    return plugins.instantiate("synthesizers", name, config)


def calibration_cache_path(teacher: Teacher, synth: Any, num_samples: int, seed: int) -> Path:
    key = short_hash({"teacher": teacher.fingerprint(), "method": synth.name, "version": synth.version,
                      "config": synth.config_dict(), "seed": seed, "num_samples": num_samples, "format": 1})
    return cache_root() / "calibration" / f"{synth.name}-{key}.safetensors"


def synthesize(model: nn.Module | str, source: str | dict[str, Any] = "zeroq", *,
               input_spec: InputSpec | None = None, num_samples: int = 256, batch_size: int = 32, seed: int = 0,
               data: Any = None, cache: bool = True, progress: bool = True) -> CalibrationSet:
    """Synthesize (or load from the cache) a calibration set for ``model``.

    The cache key is (teacher fingerprint, method, config, seed, size). An interrupted run keeps
    its finished batches and resumes from them.
    """
    model, spec = resolve_model(model, input_spec)
    synth = make_synthesizer(source, data)
    if num_samples < 1:
        raise ValueError("num_samples must be at least 1")
    with borrowed_teacher(model, spec) as teacher:
        path = calibration_cache_path(teacher, synth, num_samples, seed) if cache and synth.cacheable else None
        if path is not None and path.exists():
            cs = CalibrationSet.load(path)
            return cs.with_batch_size(batch_size) if cs.batch_size != batch_size else cs
        workdir = path.with_suffix(".partial") if path is not None else None
        started = time.perf_counter()
        cs = synth.synthesize(teacher, num_samples, seed=seed, batch_size=batch_size, progress=progress,
                              workdir=workdir)
    cs.manifest["synth_seconds"] = round(time.perf_counter() - started, 3)
    if path is not None:
        cs.save(path)
        shutil.rmtree(workdir, ignore_errors=True)
    return cs


def quantize(model: nn.Module | str, *, toolchain: str | dict[str, Any] = "torch-ao-fx",
             source: str | dict[str, Any] | CalibrationSet = "zeroq", scheme: str | dict | QuantScheme = "w8a8",
             input_spec: InputSpec | None = None, num_samples: int = 256, batch_size: int = 32, seed: int = 0,
             data: Any = None, trainable: bool = False, cache: bool = True, progress: bool = True) -> nn.Module:
    """Data-free quantization in one call; returns the toolchain's own quantized model.

    ``trainable=True`` returns the calibrated fake-quant student instead of the converted model.
    """
    model, spec = resolve_model(model, input_spec)
    q_scheme = QuantScheme.parse(scheme)
    chain = make_toolchain(toolchain)
    chain.check_scheme(q_scheme)  # fail before spending minutes on synthesis
    cs = source if isinstance(source, CalibrationSet) else synthesize(
        model, source, input_spec=spec, num_samples=num_samples, batch_size=batch_size, seed=seed, data=data,
        cache=cache, progress=progress)
    return chain.quantize(model, q_scheme, cs, trainable=trainable)


def make_toolchain(toolchain: str | dict[str, Any]) -> Any:
    if isinstance(toolchain, dict):
        config = dict(toolchain)
        return plugins.instantiate("toolchains", config.pop("name"), config)
    return plugins.instantiate("toolchains", toolchain)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 250) -> float:
    """Top-1 accuracy in percent."""
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        correct += int((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
    return 100.0 * correct / images.shape[0]
