"""BatchNorm-statistics inversion (ZeroQ, with the knobs of Sony MCT's data generation).

Pixels are optimised so that the batch statistics of every BN layer's input match the BN's
running statistics. What keeps the images useful for low-bit calibration (a careless
inversion is worse than noise at 4 bits): clipping to the range real pixels can take, a
smoothing + flip + jitter image pipeline, and a plateau LR schedule. The loop itself is
the shared one in ``optimizing.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .labels import Targets
from .optimizing import OptimizingSynthesizer

OUTPUT_LOSSES = ("none", "negative_min_max_diff")


@dataclass
class ZeroQSynthesizer(OptimizingSynthesizer):
    """Label-free BN-statistics inversion. Defaults: the CPU recipe measured on ResNet-20
    (200 Adam steps at lr 0.25, batches of 128, smoothing + flip + jitter, clipped)."""

    name = "zeroq"
    version = 2  # 2: channel statistics from contiguous reductions (numerically different from var_mean)
    output_loss: str = "none"
    output_loss_weight: float = 1e-5

    def __post_init__(self) -> None:
        if self.output_loss not in OUTPUT_LOSSES:
            raise ValueError(f"zeroq output_loss={self.output_loss!r}; choose one of {OUTPUT_LOSSES}")
        super().__post_init__()

    def task_loss(self, logits: torch.Tensor, features: torch.Tensor | None,
                  targets: Targets | None) -> dict[str, torch.Tensor]:
        if self.output_loss == "negative_min_max_diff":  # MCT: push the top-2 logit margin up
            top2 = logits.topk(2, dim=1).values
            return {"output": -self.output_loss_weight * (top2[:, 0] - top2[:, 1]).mean()}
        return {}
