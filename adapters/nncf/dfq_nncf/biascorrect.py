"""Bias correction under BatchNorm statistics for NNCF's quantized Torch model (the ``-bcbn`` of
FX and PT2E, dfq_plugins.quant.biascorrect), applied after ``nncf.quantize``.

Below 8-bit weights, NNCF's own fast bias correction does not save a depthwise network:
EfficientNet-Lite0 at W4A8 gave 8.8% with it and 9.4% without (real images, val1300[:500]), and
PT2E without bias correction collapses the same way (13.4%). Rounding a 3x3 depthwise kernel to 16
levels shifts each channel's mean output, and the shifts add up through 16 blocks. The correction
subtracts E[(W_q - W) x] from each layer's output, the expectation taken on the float model with
every BatchNorm normalizing by the batch's own statistics (so synthetic images work as well as
real ones). A layer without a bias gets one.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from dfq_plugins.data import CalibrationSet
from dfq_plugins.quant.biascorrect import conv_or_linear, standardized_input_means

from .ranges import _hooks, _layer_of


def _weight_quantizers(quantized: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]]:
    """Module name (as in the float model) -> (the quantized model's layer, its weight quantizer)."""
    hooks = _hooks(quantized)
    if hooks is None:
        return {}
    names = {id(m): n.removeprefix("inner.") for n, m in quantized.named_modules()}
    found = {}
    for key, slot in hooks.pre_hooks.items():
        layer = _layer_of(quantized, key)
        if not key.endswith("__1") or layer is None or not isinstance(layer, (nn.Conv2d, nn.Conv1d, nn.Linear)):
            continue
        quantizers = list(slot.values())
        if len(quantizers) == 1:
            found[names[id(layer)]] = (layer, quantizers[0])
    return found


def _apply(layer: nn.Module):
    if isinstance(layer, nn.Linear):
        return conv_or_linear("linear")
    kind = "conv1d" if isinstance(layer, nn.Conv1d) else "conv2d"
    return conv_or_linear(kind, layer.stride, layer.padding, layer.dilation, layer.groups)


@torch.no_grad()
def correct_biases_under_bn(quantized: nn.Module, float_model: nn.Module, calibration_set: CalibrationSet) -> int:
    """Subtract each weight-quantized layer's mean output shift from its bias; returns how many."""
    layers = _weight_quantizers(quantized)
    known = dict(float_model.named_modules())
    layers = {n: v for n, v in layers.items() if n in known}
    if not layers:
        warnings.warn("bias correction: found no NNCF weight quantizer to correct after", stacklevel=2)
        return 0
    means = standardized_input_means(float_model, set(layers), calibration_set)
    if means is None:
        warnings.warn("bias correction: a layer runs more than once per forward, so it has no single mean input; "
                      "NNCF's model is left as nncf.quantize returned it", stacklevel=2)
        return 0
    for name, (layer, quantizer) in layers.items():
        weight = layer.weight.detach()
        out = _apply(layer)(means[name][None].to(weight), quantizer(weight.clone()) - weight)
        shift = out.mean(dim=[d for d in range(out.dim()) if d != 1])
        if not torch.isfinite(shift).all():
            raise ValueError(f"bias correction of {name}: the calibration images give a non-finite output shift; "
                             "check the set for NaN or infinite pixels")
        if layer.bias is None:
            layer.bias = nn.Parameter(-shift, requires_grad=weight.requires_grad)
        else:
            layer.bias.data.sub_(shift.to(layer.bias.dtype))
    return len(layers)


__all__ = ["correct_biases_under_bn"]
