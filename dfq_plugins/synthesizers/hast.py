"""HAST (Li et al., CVPR 2023), synthesis part: hard samples matter.

BN-statistics matching plus a focal-weighted cross-entropy, beta * mean((1 - p_y)^gamma * CE):
samples the teacher already classifies confidently contribute little, so the optimisation
keeps the set's hard (low-confidence) samples. Published CIFAR: beta 10, gamma 2, lr 0.5,
1000 steps, no augmentation; ImageNet: beta 0.1, gamma 0.5, RRC + flip with probability 0.5.
The CPU default is beta 1 on the family's BN loss: at beta 10 the CE term drives pixels into the
clip bounds and 4-bit calibration falls below Gaussian noise (60.7 against 62.0, ResNet-20 W4A4 FX).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..teacher import Teacher
from .base import seeded_generator
from .labels import Targets, one_hot_targets
from .optimizing import OptimizingSynthesizer

LABEL_SALT = 200_003


@dataclass
class HASTSynthesizer(OptimizingSynthesizer):
    name = "hast"
    beta: float = 1.0  # published CIFAR: 10 (with the papers' mse BN loss; see recipes/published)
    gamma: float = 2.0

    def batch_targets(self, teacher: Teacher, n: int, seed: int, index: int) -> Targets:
        return one_hot_targets(n, teacher.spec.num_classes, seeded_generator(seed, salt=LABEL_SALT + index))

    def task_loss(self, logits: torch.Tensor, features: torch.Tensor | None,
                  targets: Targets | None) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(logits, targets.labels, reduction="none")
        p_y = torch.exp(-ce)
        return {"focal_ce": self.beta * ((1.0 - p_y).pow(self.gamma) * ce).mean()}
