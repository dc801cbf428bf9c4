"""Bit-FLOPs accounting: per input, each conv/linear costs MACs x weight bits x activation bits."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..scheme import QuantScheme

COUNTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
FLOAT_BITS = 32  # an unquantized layer is counted as 32-bit weights x 32-bit activations


@dataclass(frozen=True)
class LayerCost:
    """One conv/linear layer's work for a single input."""

    name: str
    macs: int
    weight_bits: int
    act_bits: int

    @property
    def bit_flops(self) -> int:
        return self.macs * self.weight_bits * self.act_bits


def layer_macs(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, int]]:
    """MACs per input of every conv/linear, in ``named_modules`` order (one eval forward of zeros).

    Hooks measure the real output sizes, so strides, padding and pooling need no formulas.
    Layers the forward never reaches count zero.
    """
    macs: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, _inputs, output: torch.Tensor) -> None:
            per_output = module.in_features if isinstance(module, nn.Linear) else \
                (module.in_channels // module.groups) * int(torch.tensor(module.kernel_size).prod())
            macs[name] = macs.get(name, 0) + (output.numel() // output.shape[0]) * per_output
        return record

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, COUNTED)]
    if not layers:
        raise ValueError("the model has no Conv or Linear layer: bit-FLOPs count conv/linear MACs only")
    handles = [m.register_forward_hook(hook(n)) for n, m in layers]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    return [(n, macs.get(n, 0)) for n, _ in layers]


def layer_costs(model: nn.Module, input_shape: Sequence[int], scheme: QuantScheme | str | None) -> list[LayerCost]:
    """Per-layer cost under ``scheme`` (first/last-layer overrides applied, as the adapters do);
    ``scheme=None`` counts every layer at 32 x 32 bits (full precision)."""
    layers = layer_macs(model, input_shape)
    if scheme is None:
        return [LayerCost(n, m, FLOAT_BITS, FLOAT_BITS) for n, m in layers]
    scheme = QuantScheme.parse(scheme)
    out = []
    for i, (name, macs) in enumerate(layers):
        bits = (scheme.weight_bits, scheme.act_bits)
        if i == 0 and scheme.first_layer is not None:
            bits = (scheme.first_layer.weight_bits, scheme.first_layer.act_bits)
        if i == len(layers) - 1 and scheme.last_layer is not None:
            bits = (scheme.last_layer.weight_bits, scheme.last_layer.act_bits)
        out.append(LayerCost(name, macs, *bits))
    return out


def bit_flops(model: nn.Module, input_shape: Sequence[int], scheme: QuantScheme | str | None,
              bits: tuple[int, int] | None = None) -> int:
    """Bit-FLOPs of one input through ``model`` quantized with ``scheme``.

    ``bits=(w, a)`` counts every layer at those bits instead (e.g. a float selector at 32 x 32).
    """
    costs = layer_costs(model, input_shape, scheme)
    if bits is not None:
        return sum(c.macs * bits[0] * bits[1] for c in costs)
    return sum(c.bit_flops for c in costs)
