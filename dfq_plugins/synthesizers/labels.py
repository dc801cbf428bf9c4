"""Label samplers for label-conditioned synthesis: what each synthetic image should look like.

Every sampler takes a seeded ``torch.Generator`` so a batch's targets can be re-drawn exactly
when a run resumes (targets are never stored in the partial work directory).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SIMILARITIES = ("dot", "cosine")
SPREADS = ("uniform", "similarity")


@dataclass
class Targets:
    """One batch's labels: hard class, soft target distribution, and per-sample extras."""

    labels: torch.Tensor  # (N,) int64
    soft: torch.Tensor  # (N, C) rows summing to 1
    target_prob: torch.Tensor  # (N,) probability the soft target puts on ``labels``
    hard_mask: torch.Tensor  # (N,) bool: sample was asked to be hard (ambiguous)

    def to(self, device: torch.device) -> Targets:
        """The same targets on ``device`` (drawn on the CPU, used where the teacher computes)."""
        return Targets(*(t.to(device) for t in (self.labels, self.soft, self.target_prob, self.hard_mask)))


def uniform_labels(n: int, num_classes: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, num_classes, (n,), generator=g)


def one_hot_targets(n: int, num_classes: int, g: torch.Generator) -> Targets:
    labels = uniform_labels(n, num_classes, g)
    return Targets(labels, F.one_hot(labels, num_classes).float(), torch.ones(n), torch.zeros(n, dtype=torch.bool))


def target_probability_targets(n: int, num_classes: int, g: torch.Generator, p_low: float,
                               fraction: float = 0.5) -> Targets:
    """IntraQ: a ``fraction`` of samples get a target probability ~ U[p_low, 1], the rest 1.

    Only the target entry is constrained (the rest of ``soft`` spreads 1-p uniformly, for
    methods that need a full distribution).
    """
    if not 0.0 < p_low <= 1.0:
        raise ValueError(f"target probability p_low={p_low} must be in (0, 1]")
    labels = uniform_labels(n, num_classes, g)
    draw = p_low + (1.0 - p_low) * torch.rand(n, generator=g)
    soft_mask = torch.rand(n, generator=g) < fraction
    p = torch.where(soft_mask, draw, torch.ones(n))
    rest = ((1.0 - p) / max(num_classes - 1, 1)).unsqueeze(1).expand(n, num_classes).clone()
    soft = rest.scatter(1, labels.unsqueeze(1), p.unsqueeze(1))
    return Targets(labels, soft, p, soft_mask)


def class_similarity(weight: torch.Tensor, metric: str = "dot") -> torch.Tensor:
    """DynaDFQ's class similarity from the classifier's weight rows (C, d): dot product or cosine."""
    if metric not in SIMILARITIES:
        raise ValueError(f"similarity={metric!r}; choose one of {SIMILARITIES}")
    w = weight.detach().float()
    if metric == "cosine":
        w = F.normalize(w, dim=1)
    return w @ w.T


def similar_class_targets(n: int, similarity: torch.Tensor, g: torch.Generator, *, hard_fraction: float,
                          group_size: int, rho_range: tuple[float, float], spread: str = "uniform") -> Targets:
    """DynaDFQ: easy samples one-hot; hard samples keep ``rho`` on their class and share 1-rho
    among the ``group_size`` most similar classes (plausible confusions)."""
    c = similarity.shape[0]
    if spread not in SPREADS:
        raise ValueError(f"spread={spread!r}; choose one of {SPREADS}")
    if not 0.0 <= hard_fraction <= 1.0:
        raise ValueError("hard_fraction must be in [0, 1]")
    lo, hi = rho_range
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"rho_range={rho_range} must satisfy 0 < low <= high <= 1")
    k = min(group_size, c - 1)
    if k < 1:
        raise ValueError("similar-class soft labels need at least 2 classes and group_size >= 1")
    labels = uniform_labels(n, c, g)
    hard = torch.rand(n, generator=g) < hard_fraction
    rho = torch.where(hard, lo + (hi - lo) * torch.rand(n, generator=g), torch.ones(n))
    sim = similarity.clone()
    sim.fill_diagonal_(float("-inf"))
    top_sim, neighbours = sim[labels].topk(k, dim=1)
    share = torch.full((n, k), 1.0 / k) if spread == "uniform" else torch.softmax(top_sim, dim=1)
    soft = torch.zeros(n, c)
    soft.scatter_(1, neighbours, share * (1.0 - rho).unsqueeze(1))
    soft.scatter_(1, labels.unsqueeze(1), rho.unsqueeze(1))
    return Targets(labels, soft, rho, hard)


__all__ = ["Targets", "class_similarity", "one_hot_targets", "similar_class_targets",
           "target_probability_targets", "uniform_labels"]
