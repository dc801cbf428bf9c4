"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization"; NNCF's fast bias
correction) for FX and PT2E post-training graphs.

Rounding a layer's weights to few bits shifts the mean of its output: E[W_q x] - E[W x] =
E[(W_q - W) x] per output channel, largest where a channel has few weights (depthwise convs, 9 per
channel at 3x3) and at 4 bits. Subtracting that shift from the bias, measured on the calibration
images, removes it. The expectation is taken over the float model's inputs to each layer (one pass,
observers bypassed), computed exactly as the layer computes (padding and stride included) with the
weight error as the kernel.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..data import CalibrationSet
from .blocks import owner_and_attr


@dataclass
class WeightedLayer:
    """A conv/linear of a prepared graph: how to quantize its weight, where its bias lives."""

    node: fx.Node
    weight: torch.Tensor  # the float weight the layer uses (BN folded)
    quantize: Callable[[torch.Tensor], torch.Tensor]  # the toolchain's own weight fake-quant
    bias_owner: nn.Module | None  # module holding the bias (None: the layer has no bias to correct)
    bias_name: str
    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input, kernel) -> output, no bias


def _is_observer(module: nn.Module) -> bool:
    return hasattr(module, "calculate_qparams") and not isinstance(module, (nn.Conv2d, nn.Linear))


class _MeanShift(fx.Interpreter):
    """Runs the float graph with observers bypassed, accumulating E[(W_q - W) x] per layer."""

    def __init__(self, gm: fx.GraphModule, layers: list[WeightedLayer]) -> None:
        super().__init__(gm)
        self.by_node = {layer.node: layer for layer in layers}
        self.delta = {layer.node: (layer.quantize(layer.weight) - layer.weight).detach() for layer in layers}
        self.sums: dict[fx.Node, torch.Tensor] = {}
        self.counts: dict[fx.Node, int] = {}
        self.observers = {n for n in gm.graph.nodes
                          if n.op == "call_module" and _is_observer(gm.get_submodule(str(n.target)))}

    def run_node(self, n: fx.Node) -> Any:
        if n in self.observers:
            return self.env[n.args[0]] if isinstance(n.args[0], fx.Node) else n.args[0]
        out = super().run_node(n)
        layer = self.by_node.get(n)
        if layer is not None:
            shift = layer.apply(self.env[n.args[0]], self.delta[n])
            self.sums[n] = self.sums.get(n, 0) + shift.sum(dim=[d for d in range(shift.dim()) if d != 1])
            self.counts[n] = self.counts.get(n, 0) + shift.numel() // shift.shape[1]
        return out


@torch.no_grad()
def correct_biases(gm: fx.GraphModule, layers: list[WeightedLayer], calibration_set: CalibrationSet) -> int:
    """Subtract each layer's mean output shift from its bias; returns how many biases changed."""
    if not layers:
        return 0
    interp = _MeanShift(gm, layers)
    for batch in calibration_set:
        x = batch[0] if isinstance(batch, tuple) else batch
        if isinstance(x, dict):
            raise TypeError("bias correction needs positional image batches")
        interp.run(x)
    changed = 0
    for layer in layers:
        bias = None if layer.bias_owner is None else getattr(layer.bias_owner, layer.bias_name, None)
        if bias is None or layer.node not in interp.sums:
            continue
        shift = interp.sums[layer.node] / interp.counts[layer.node]
        if not torch.isfinite(shift).all():
            raise ValueError(f"bias correction of {layer.node.name}: the calibration images give a non-finite "
                             "output shift; check the set for NaN or infinite pixels")
        bias.data.sub_(shift.to(bias.dtype))
        changed += 1
    return changed


def observed_fake_quant(observer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The weight quantization an observer's qparams define (what convert will apply)."""
    scale, zero_point = observer.calculate_qparams()
    qmin, qmax = int(observer.quant_min), int(observer.quant_max)
    if observer.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine):
        axis = int(observer.ch_axis)
        return lambda w: torch.fake_quantize_per_channel_affine(w, scale.float(), zero_point.int(), axis, qmin, qmax)
    return lambda w: torch.fake_quantize_per_tensor_affine(w, float(scale), int(zero_point), qmin, qmax)


_PT2E_LAYERS = {"aten.conv2d.default": "conv2d", "aten.conv1d.default": "conv1d", "aten.linear.default": "linear"}


def pt2e_layers(gm: fx.GraphModule) -> list[WeightedLayer]:
    """Conv/linear nodes of a prepared (post-training) PT2E graph whose weight goes through an observer."""
    layers = []
    for node in gm.graph.nodes:
        kind = _PT2E_LAYERS.get(str(node.target)) if node.op == "call_function" else None
        if kind is None or len(node.args) < 2:
            continue
        w_obs = node.args[1]
        if not (isinstance(w_obs, fx.Node) and w_obs.op == "call_module" and isinstance(w_obs.args[0], fx.Node)
                and w_obs.args[0].op == "get_attr"):
            continue
        observer = gm.get_submodule(str(w_obs.target))
        if not _is_observer(observer):
            continue
        weight = getattr(*owner_and_attr(gm, str(w_obs.args[0].target)))
        bias = node.args[2] if len(node.args) > 2 else None
        owner, bias_name = None, ""
        if isinstance(bias, fx.Node) and bias.op == "get_attr":
            owner, bias_name = owner_and_attr(gm, str(bias.target))
        rest = list(node.args[3:]) if kind != "linear" else []
        layers.append(WeightedLayer(node, weight.detach(), observed_fake_quant(observer), owner, bias_name,
                                    conv_or_linear(kind, *rest)))
    return layers


def fx_layers(gm: fx.GraphModule) -> list[WeightedLayer]:
    """Conv/linear modules of a prepared (post-training) FX graph that convert will quantize.

    FX observes weights only at convert, with a fresh ``qconfig.weight()`` observer; the same
    observer is run here on the same weight, so the qparams are the ones convert will use.
    """
    layers = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(str(node.target))
        qconfig = getattr(module, "qconfig", None)
        layer = module[0] if isinstance(module, nn.Sequential) and len(module) else module  # fused conv+relu
        if qconfig is None or not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            continue
        observer = qconfig.weight()
        observer(layer.weight.detach())
        if isinstance(layer, nn.Linear):
            apply = conv_or_linear("linear")
        else:
            kind = "conv1d" if isinstance(layer, nn.Conv1d) else "conv2d"
            if layer.padding_mode != "zeros":
                continue
            apply = conv_or_linear(kind, layer.stride, layer.padding, layer.dilation, layer.groups)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.out_channels if not isinstance(layer, nn.Linear)
                                                  else layer.out_features, dtype=layer.weight.dtype),
                                      requires_grad=layer.weight.requires_grad)
        layers.append(WeightedLayer(node, layer.weight.detach(), observed_fake_quant(observer), layer, "bias", apply))
    return layers


def conv_or_linear(kind: str, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
                   groups: int = 1) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if kind == "linear":
        return lambda x, w: F.linear(x, w)
    if kind == "conv1d":
        return lambda x, w: F.conv1d(x, w, None, stride, padding, dilation, groups)
    return lambda x, w: F.conv2d(x, w, None, stride, padding, dilation, groups)


__all__ = ["WeightedLayer", "correct_biases", "fx_layers", "pt2e_layers"]
