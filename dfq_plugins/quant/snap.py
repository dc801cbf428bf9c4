"""Put a trained student's weights on their quantization grid, so convert cannot round them otherwise.

Training through a straight-through fake-quant leaves many weights right at a rounding boundary.
``convert`` re-folds BatchNorm into the weights with slightly different float arithmetic than the
training graph, and a weight sitting on a boundary then rounds the other way: measured 0.3 points
of top-1 between a reconstructed PT2E student and its converted model. Snapping each weight to
the centre of the bin the student used removes that gap without changing what the student computes.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from .blocks import owner_and_attr


def _weight_quantizers(student: nn.Module) -> list[tuple[nn.Parameter, nn.Module]]:
    """(weight parameter, its fake-quant) pairs: FX QAT modules, or PT2E graph nodes fed by a weight."""
    pairs: list[tuple[nn.Parameter, nn.Module]] = []
    for module in student.modules():
        fq = getattr(module, "weight_fake_quant", None)
        if fq is not None and isinstance(getattr(module, "weight", None), nn.Parameter):
            pairs.append((module.weight, fq))
    if isinstance(student, fx.GraphModule):
        for node in student.graph.nodes:
            if node.op != "call_module" or not node.args:
                continue
            fq = student.get_submodule(str(node.target))
            if not hasattr(fq, "fake_quant_enabled"):
                continue
            arg = node.args[0]
            while isinstance(arg, fx.Node) and arg.op == "call_function" and arg.args:  # through BN folding
                arg = arg.args[0]
            if isinstance(arg, fx.Node) and arg.op == "get_attr":
                param = getattr(*owner_and_attr(student, str(arg.target)))
                if isinstance(param, nn.Parameter):
                    pairs.append((param, fq))
    return pairs


@torch.no_grad()
def snap_weights_to_grid(student: nn.Module, example: Any, toolchain: Any) -> int:
    """Move every quantized weight to the centre of its current bin; returns how many tensors moved."""
    pairs = _weight_quantizers(student)
    seen: dict[int, torch.Tensor] = {}
    handles = [fq.register_forward_pre_hook(lambda m, a: seen.__setitem__(id(m), a[0].detach().clone()))
               for _, fq in pairs]
    try:
        with toolchain.measuring(student):
            student(example)
            snapped = 0
            for param, fq in pairs:
                x = seen.get(id(fq))
                if x is None or x.shape != param.shape:
                    continue
                q = fq(x)  # the bin centres the student used
                factor = torch.where(param != 0, x / torch.where(param != 0, param, torch.ones_like(param)),
                                     torch.ones_like(param))  # BN folding multiplies per channel
                param.copy_(torch.where(param != 0, q / factor, param))
                snapped += 1
    finally:
        for h in handles:
            h.remove()
    return snapped


__all__ = ["snap_weights_to_grid"]
