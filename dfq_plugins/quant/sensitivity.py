"""Which layers lose most when their weights alone are rounded: one conv/linear at a time gets
per-channel symmetric MinMax weights at the scheme's bits, the rest stays float, and the KL
divergence of the logits from the float model's is measured on the calibration images.

On EfficientNet-Lite0 at 4 bits the three worst are depthwise convolutions (blocks 0, 8 and 1;
0.3% of the weights); keeping their weights at 8 bits took PT2E W4A8 from 72.9 to 77.5 (real
images, val1300[:1000]). ``QuantScheme(sensitive_8bit=N)`` (``w4a8-top3``) does that.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear)


def fake_quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per output channel, symmetric, MinMax over levels -2^(b-1) .. 2^(b-1)-1."""
    qmax = 2 ** (bits - 1) - 1
    scale = weight.abs().amax(dim=tuple(range(1, weight.dim())), keepdim=True).clamp_min(1e-12) / (qmax + 0.5)
    return (weight / scale).round().clamp(-qmax - 1, qmax) * scale


@torch.no_grad()
def layer_report(model: nn.Module, images: torch.Tensor, bits: int) -> list[dict]:
    """Per conv/linear, its weights alone at ``bits``: the KL of the logits from the float model's,
    top-1 agreement with it (%), and the weights' relative rounding error."""
    was_training = model.training
    model.eval()
    rows = []
    try:
        reference = F.log_softmax(model(images), dim=1)
        for name, module in model.named_modules():
            if not isinstance(module, WEIGHTED):
                continue
            original = module.weight.data.clone()
            rounded = fake_quantize_weight(original, bits)
            module.weight.data.copy_(rounded)
            try:
                logits = F.log_softmax(model(images), dim=1)
            finally:
                module.weight.data.copy_(original)
            rows.append({"layer": name, "kl": float(F.kl_div(logits, reference, log_target=True, reduction="batchmean")),
                         "top1_agreement": float((logits.argmax(1) == reference.argmax(1)).float().mean() * 100),
                         "weight_error": float((rounded - original).norm() / original.norm().clamp_min(1e-12))})
    finally:
        model.train(was_training)
    return rows


def layer_sensitivities(model: nn.Module, images: torch.Tensor, bits: int) -> dict[str, float]:
    """Layer name -> KL(float logits || logits with that layer's weights alone at ``bits``)."""
    return {row["layer"]: row["kl"] for row in layer_report(model, images, bits)}


def most_sensitive_layers(model: nn.Module, images: torch.Tensor, bits: int, count: int) -> list[str]:
    """The ``count`` layers with the largest sensitivity, most sensitive first."""
    scores = layer_sensitivities(model, images, bits)
    if not all(torch.isfinite(torch.tensor(v)) for v in scores.values()):
        raise ValueError("layer sensitivity: a non-finite KL; check the calibration images for NaN pixels")
    return sorted(scores, key=lambda n: -scores[n])[:count]


__all__ = ["fake_quantize_weight", "layer_report", "layer_sensitivities", "most_sensitive_layers"]
