"""Data-free drop-ins for NNCF users: a calibration_dataset and an ``nncf.quantize`` twin."""
from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from dfq_plugins.spec import InputSpec

from .toolchain import _CallWrapper, configure_extension_build, needs_wrapping


def calibration_dataset(model: nn.Module, source: str | dict[str, Any] = "zeroq", *, input_spec: InputSpec,
                        num_samples: int = 256, batch_size: int = 32, seed: int = 0, cache: bool = True,
                        progress: bool = True) -> Any:
    """An ``nncf.Dataset`` of synthetic batches for ``model``: pass it where real data would go."""
    return _synthetic_dataset(model, source, input_spec, num_samples, batch_size, seed, cache, progress)


def _synthetic_dataset(model: nn.Module, source: str | dict[str, Any], input_spec: InputSpec, num_samples: int,
                       batch_size: int, seed: int, cache: bool = True, progress: bool = True) -> Any:
    from dfq_plugins.api import synthesize

    cs = synthesize(model, source, input_spec=input_spec, num_samples=num_samples, batch_size=batch_size,
                    seed=seed, cache=cache, progress=progress)
    from dfq_plugins.device import module_device

    return cs.as_nncf(module_device(model))  # batches go where the model is


def quantize(model: nn.Module, calibration_dataset: Any = None, *, source: str | dict[str, Any] | None = None,
             input_spec: InputSpec | None = None, num_samples: int = 256, batch_size: int = 32, seed: int = 0,
             **nncf_kwargs: Any) -> nn.Module:
    """``nncf.quantize`` with a data-free option.

    Takes ``nncf.quantize``'s own keyword arguments. Give either ``calibration_dataset`` (real
    data, unchanged behaviour) or ``source`` (a synthesizer name or ``{"name": ..., **config}``)
    plus the model's ``input_spec``. ``subset_size`` defaults to the whole synthetic set.
    """
    configure_extension_build()
    import nncf

    if (calibration_dataset is None) == (source is None):
        raise ValueError("give exactly one of calibration_dataset (real data) or source (data-free)")
    if source is not None:
        if input_spec is None:
            raise ValueError("a data-free source needs input_spec=InputSpec(shape, mean, std, num_classes): "
                             "the input normalisation cannot be guessed from the model")
        calibration_dataset = _synthetic_dataset(model, source, input_spec, num_samples, batch_size, seed)
        nncf_kwargs.setdefault("subset_size", -(-num_samples // batch_size))
    warn_if_low_bit_depthwise(model, nncf_kwargs.get("advanced_parameters"))
    if needs_wrapping(model):
        model = _CallWrapper(model)
    return nncf.quantize(model, calibration_dataset, **nncf_kwargs)


def warn_if_low_bit_depthwise(model: nn.Module, advanced_parameters: Any) -> bool:
    """Warn where ``nncf.quantize`` alone is known to return a broken model: weights below 8 bits on
    a network with depthwise convolutions (EfficientNet-Lite0 W4A8: 8.8% top-1, FP 82.1)."""
    params = getattr(advanced_parameters, "weights_quantization_params", None)
    bits = getattr(params, "num_bits", None)
    depthwise = [n for n, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]
    if bits is None or bits >= 8 or not depthwise:
        return False
    warnings.warn(
        f"{bits}-bit weights on a model with {len(depthwise)} depthwise convolutions: nncf.quantize's own bias "
        "correction does not hold them (EfficientNet-Lite0 at W4A8 gave 8.8% top-1). "
        f"dfq_plugins.quantize(model, toolchain='nncf', scheme='w{bits}a8', ...) corrects the biases under "
        "BatchNorm statistics after NNCF (Lite0: 71.6%); or use toolchain='torchao-pt2e'", stacklevel=2)
    return True

