"""IntraQ's class-centre memory and intra-class cosine hinge.

The memory holds the mean penultimate feature of the images already synthesized per class;
the hinge keeps a new image's feature between ``m_low`` and ``m_up`` in cosine distance from
its class centre, so images of one class do not collapse onto one point.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class ClassCentreMemory:
    """Running mean feature per class (classes not seen yet have no centre)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.sums: torch.Tensor | None = None
        self.counts = torch.zeros(num_classes)

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        features = features.detach().flatten(1).float()
        if self.sums is None:
            self.sums = torch.zeros(self.num_classes, features.shape[1])
        self.sums.index_add_(0, labels, features)
        self.counts += torch.bincount(labels, minlength=self.num_classes).float()

    def centres(self, labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(centre per sample or None, mask of samples whose class has a centre)."""
        known = self.counts[labels] > 0
        if self.sums is None or not bool(known.any()):
            return None, known
        return self.sums[labels] / self.counts[labels].clamp_min(1).unsqueeze(1), known


def cosine_hinge(features: torch.Tensor, centres: torch.Tensor | None, known: torch.Tensor,
                 m_low: float, m_up: float) -> torch.Tensor:
    """mean over known samples of max(m_low - d, 0) + max(d - m_up, 0), d = 1 - cos(f, centre)."""
    if centres is None or m_low <= 0 and m_up >= 2:
        return features.new_zeros(())
    d = 1.0 - F.cosine_similarity(features.flatten(1), centres, dim=1)
    hinge = torch.relu(m_low - d) + torch.relu(d - m_up)
    return (hinge * known).sum() / known.sum().clamp_min(1)


__all__ = ["ClassCentreMemory", "cosine_hinge"]
