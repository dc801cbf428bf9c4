"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization"; NNCF's fast bias
correction) for FX and PT2E post-training graphs.

Rounding a layer's weights to few bits shifts the mean of its output: E[W_q x] - E[W x] =
E[(W_q - W) x] per output channel, largest where a channel has few weights (depthwise convs, 9 per
channel at 3x3) and at 4 bits. Subtracting that shift from the bias, measured on the calibration
images, removes it. The expectation is taken over the float model's inputs to each layer (one pass,
observers bypassed), computed exactly as the layer computes (padding and stride included) with the
weight error as the kernel.

Synthetic images rarely give each layer the input mean that real images give, and the estimate of
the shift inherits that error (EfficientNet-Lite0 W4A8: zeroq images 68.8 against 73.0 with real
ones). With ``standardize_with=model`` the expectations are taken on the float model with every
BatchNorm normalizing by the batch's own statistics, so each BN output has, per channel, the mean
and variance the model saw in training whatever the images; only the shape of the distribution
comes from the images (Lite0: zeroq 72.9, real 72.9). By linearity the shift is then the layer's
op applied to its mean input map with the weight error as the kernel.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


def _image_batches(calibration_set: CalibrationSet, model: nn.Module) -> Iterator[torch.Tensor]:
    """The set's image batches on ``model``'s device."""
    from ..device import module_device

    device = module_device(model)
    for batch in calibration_set:
        x = batch[0] if isinstance(batch, tuple) else batch
        if isinstance(x, dict):
            raise TypeError("bias correction needs positional image batches")
        yield x.to(device)


def _graph_shifts(gm: fx.GraphModule, layers: list[WeightedLayer],
                  calibration_set: CalibrationSet) -> dict[fx.Node, torch.Tensor]:
    interp = _MeanShift(gm, layers)
    for x in _image_batches(calibration_set, gm):
        interp.run(x)
    return {node: interp.sums[node] / interp.counts[node] for node in interp.sums}


def layer_module_name(node: fx.Node) -> str | None:
    """The float model's module a graph layer came from (FX and torch.export keep ``nn_module_stack``)."""
    stack = node.meta.get("nn_module_stack") or {}
    last = list(stack.values())[-1] if stack else None
    return str(last[0]) if isinstance(last, tuple) and last else None


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode except its BatchNorms, which normalize by each batch's own statistics
    and leave their running statistics untouched; restored on exit."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in norms]
    training = model.training
    model.eval()
    for m in norms:
        m.train()
        m.track_running_stats = False  # with training=True: batch statistics, no running-stat update
    try:
        yield model
    finally:
        model.train(training)
        for m, (was_training, tracked) in zip(norms, saved):
            m.train(was_training)
            m.track_running_stats = tracked


def standardized_input_means(model: nn.Module, names: set[str],
                             calibration_set: CalibrationSet) -> dict[str, torch.Tensor] | None:
    """Mean input map (C, H, W) of each named module under :func:`batch_statistics`; None when a
    module is called more than once per forward or with varying input shapes (no single map)."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}
    count = images = 0
    ambiguous = False

    def hook(name: str) -> Callable[..., None]:
        def record(_module: nn.Module, args: tuple) -> None:
            nonlocal ambiguous
            x = args[0].detach().double().sum(0)
            calls[name] = calls.get(name, 0) + 1
            if name in sums and sums[name].shape != x.shape:
                ambiguous = True
                return
            sums[name] = sums.get(name, 0) + x
        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad(), batch_statistics(model):
            for x in _image_batches(calibration_set, model):
                if x.shape[0] < 2:
                    raise ValueError("bias correction with BatchNorm statistics needs batches of at least 2 images")
                model(x)
                count += 1
                images += x.shape[0]
                if ambiguous or any(calls.get(n, 0) != count for n in names):
                    return None
    finally:
        for h in handles:
            h.remove()
    return {n: (v / images).float() for n, v in sums.items()}


def _standardized_shifts(model: nn.Module, layers: list[WeightedLayer],
                         calibration_set: CalibrationSet) -> dict[fx.Node, torch.Tensor] | None:
    names = {layer.node: layer_module_name(layer.node) for layer in layers}
    known = dict(model.named_modules())
    wanted = [n for n in names.values() if n is not None]
    if len(wanted) != len(names) or len(set(wanted)) != len(wanted) or not all(n in known for n in wanted):
        return None
    means = standardized_input_means(model, set(wanted), calibration_set)
    if means is None:
        return None
    shifts = {}
    for layer in layers:
        out = layer.apply(means[names[layer.node]][None], layer.quantize(layer.weight) - layer.weight)
        shifts[layer.node] = out.mean(dim=[d for d in range(out.dim()) if d != 1])
    return shifts


@torch.no_grad()
def correct_biases(gm: fx.GraphModule, layers: list[WeightedLayer], calibration_set: CalibrationSet,
                   standardize_with: nn.Module | None = None) -> int:
    """Subtract each layer's mean output shift from its bias; returns how many biases changed.

    ``standardize_with``: the float model the graph was prepared from; the expectations are then
    taken under its BatchNorm statistics (module docstring). Where the graph's layers cannot be
    matched one to one with the model's modules, the images are used as they are, with a warning.
    """
    if not layers:
        return 0
    shifts = None
    if standardize_with is not None:
        shifts = _standardized_shifts(standardize_with, layers, calibration_set)
        if shifts is None:
            warnings.warn("bias correction: the graph's layers do not map one to one onto the model's modules "
                          "(a module called twice, or names lost in tracing), so the expectations are taken on "
                          "the calibration images as they are, without BatchNorm standardization", stacklevel=2)
    if shifts is None:
        shifts = _graph_shifts(gm, layers, calibration_set)
    changed = 0
    for layer in layers:
        bias = None if layer.bias_owner is None else getattr(layer.bias_owner, layer.bias_name, None)
        if bias is None or layer.node not in shifts:
            continue
        shift = shifts[layer.node]
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
    """Conv/linear nodes of a prepared PT2E graph whose weight goes through an observer or fake-quant.

    Post-training graphs carry folded weights and biases. QAT graphs (``prepare_qat_pt2e``) keep conv-BN
    apart: the weight is scaled by gamma/sigma before its fake-quant and the conv output is divided back
    before the BN, so in eval mode a shift of the conv output is a shift of the BN output: its beta is
    the bias to correct."""
    layers = []
    for node in gm.graph.nodes:
        kind = _PT2E_LAYERS.get(str(node.target)) if node.op == "call_function" else None
        if kind is None or len(node.args) < 2:
            continue
        w_obs = node.args[1]
        if not (isinstance(w_obs, fx.Node) and w_obs.op == "call_module" and isinstance(w_obs.args[0], fx.Node)):
            continue
        observer = gm.get_submodule(str(w_obs.target))
        if not _is_observer(observer):
            continue
        owner, bias_name = None, ""
        if w_obs.args[0].op == "get_attr":  # post-training: BN already folded into the weight and bias
            weight = getattr(*owner_and_attr(gm, str(w_obs.args[0].target)))
            bias = node.args[2] if len(node.args) > 2 else None
            if isinstance(bias, fx.Node) and bias.op == "get_attr":
                owner, bias_name = owner_and_attr(gm, str(bias.target))
        else:  # QAT conv-BN: the weight is scaled by gamma/sigma in the graph, the BN's beta takes the shift
            weight = _constant_value(gm, w_obs.args[0])
            beta = _following_bn_beta(node)
            if weight is None or beta is None:
                continue
            owner, bias_name = owner_and_attr(gm, str(beta.target))
        rest = list(node.args[3:]) if kind != "linear" else []
        layers.append(WeightedLayer(node, weight.detach(), observed_fake_quant(observer), owner, bias_name,
                                    conv_or_linear(kind, *rest)))
    return layers


def _constant_value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The value of a node computed from parameters only (QAT's folded weight); None if it reads an input."""
    memo: dict[fx.Node, Any] = {}

    def value(n: Any) -> Any:
        if not isinstance(n, fx.Node):
            return n
        if n not in memo:
            if n.op == "get_attr":
                memo[n] = getattr(*owner_and_attr(gm, str(n.target)))
            elif n.op == "call_function":
                memo[n] = n.target(*[value(a) for a in n.args], **{k: value(v) for k, v in n.kwargs.items()})
            else:
                raise LookupError(n.name)
        return memo[n]

    try:
        with torch.no_grad():
            out = value(node)
    except LookupError:
        return None
    return out.detach() if torch.is_tensor(out) else None


_BN_TARGETS = ("aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default")


def _following_bn_beta(conv: fx.Node) -> fx.Node | None:
    """The get_attr node of the BN beta a QAT conv feeds, through the ``/ scale`` (and bias add) torchao inserts;
    None when the conv's output goes anywhere else on the way (the shift would not land on that BN alone)."""
    node = conv
    for _ in range(4):
        if len(node.users) != 1:
            return None
        (node,) = node.users
        if str(node.target) in _BN_TARGETS:
            beta = node.args[2] if len(node.args) > 2 else None
            return beta if isinstance(beta, fx.Node) and beta.op == "get_attr" else None
        if str(node.target) not in ("aten.div.Tensor", "aten.add.Tensor"):
            return None
    return None


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


def fx_qat_layers(gm: fx.GraphModule) -> list[WeightedLayer]:
    """Weighted modules of a trainable FX student. Conv-BN ones (``prepare_qat_fx``'s ConvBn2d, ConvBnReLU2d)
    compute ``conv(x, fq(W * gamma / sigma))`` shifted by the BN in eval mode, so the BN's beta takes the
    correction; qat Conv2d and Linear take it in their own bias."""
    layers = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(str(node.target))
        bn = getattr(module, "bn", None)
        fake_quant = getattr(module, "weight_fake_quant", None)
        if fake_quant is None:
            continue
        if isinstance(module, nn.Linear) and module.bias is not None:  # qat Linear: its own bias
            layers.append(WeightedLayer(node, module.weight.detach(), observed_fake_quant(fake_quant), module, "bias",
                                        conv_or_linear("linear")))
            continue
        if not (isinstance(module, nn.Conv2d) and module.padding_mode == "zeros"):
            continue
        apply = conv_or_linear("conv2d", module.stride, module.padding, module.dilation, module.groups)
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.affine and bn.running_var is not None:
            scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            weight = module.weight.detach() * scale.reshape(-1, *([1] * (module.weight.dim() - 1)))
            layers.append(WeightedLayer(node, weight, observed_fake_quant(fake_quant), bn, "bias", apply))
        elif bn is None and module.bias is not None:  # qat Conv2d (no BN): its own bias
            layers.append(WeightedLayer(node, module.weight.detach(), observed_fake_quant(fake_quant), module, "bias",
                                        apply))
    return layers


def conv_or_linear(kind: str, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
                   groups: int = 1) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if kind == "linear":
        return lambda x, w: F.linear(x, w)
    if kind == "conv1d":
        return lambda x, w: F.conv1d(x, w, None, stride, padding, dilation, groups)
    return lambda x, w: F.conv2d(x, w, None, stride, padding, dilation, groups)


__all__ = ["WeightedLayer", "batch_statistics", "correct_biases", "fx_layers", "fx_qat_layers", "layer_module_name", "pt2e_layers",
           "standardized_input_means"]
