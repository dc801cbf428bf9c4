"""IntraQ (Zhong et al., CVPR 2022): synthetic images with intra-class heterogeneity.

BN-statistics matching plus two label terms: the teacher's probability of the target class
is pulled to a per-sample target (U[p_low, 1] for half the samples, 1 for the rest), and the
cosine distance of each image's penultimate feature to its class centre (the mean feature of
the images already synthesized for that class) is held between ``m_low`` and ``m_up``.
Published (CIFAR-10): lr 0.5, 1000 steps, batches of 256, RandomResizedCrop(0.5, 1) + flip
with probability 0.5, p_low 0.95, m_low 0.05, m_up 0.8; see ``recipes/published``. The CPU
defaults keep IntraQ's label terms on the family's BN loss and image pipeline (std, squared L2,
smoothing + flip + jitter): with the paper's mse-on-variance loss and crops, 4-bit calibration
on ResNet-20 (FX, 256 images) measured 67.7 against 73.5.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..teacher import Teacher
from .base import seeded_generator, teacher_features
from .labels import Targets, target_probability_targets
from .memory import ClassCentreMemory, cosine_hinge
from .optimizing import OptimizingSynthesizer

LABEL_SALT = 100_003  # label draws use their own stream, so pixels and labels resume independently


@dataclass
class IntraQSynthesizer(OptimizingSynthesizer):
    name = "intraq"
    batches_independent: ClassVar[bool] = False  # each batch learns from the class centres before it
    wants_features = True
    p_low: float = 0.95
    soft_fraction: float = 0.5
    target_weight: float = 1.0
    m_low: float = 0.05
    m_up: float = 0.8
    hinge_weight: float = 1.0

    def prepare(self, teacher: Teacher, seed: int) -> None:
        self.memory = ClassCentreMemory(teacher.spec.num_classes)

    def batch_targets(self, teacher: Teacher, n: int, seed: int, index: int) -> Targets:
        g = seeded_generator(seed, salt=LABEL_SALT + index)
        return target_probability_targets(n, teacher.spec.num_classes, g, self.p_low, self.soft_fraction)

    def task_loss(self, logits: torch.Tensor, features: torch.Tensor | None,
                  targets: Targets | None) -> dict[str, torch.Tensor]:
        p_target = logits.softmax(1).gather(1, targets.labels.unsqueeze(1)).squeeze(1)
        terms = {"target": self.target_weight * (p_target - targets.target_prob).pow(2).mean()}
        if self.hinge_weight and features is not None:
            if getattr(self, "_centres_of", (None,))[0] is not targets:  # once per batch, not per step
                centres, known = self.memory.centres(targets.labels.cpu())  # the memory lives on the CPU
                self._centres_of = (targets, None if centres is None else centres.to(features.device),
                                    known.to(features.device))
            _, centres, known = self._centres_of
            terms["hinge"] = self.hinge_weight * cosine_hinge(features, centres, known, self.m_low, self.m_up)
        return terms

    def after_batch(self, teacher: Teacher, images: torch.Tensor, targets: Targets | None) -> None:
        self.memory.update(teacher_features(teacher, images), targets.labels.cpu())
