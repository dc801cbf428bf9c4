"""The bit selector: a tiny network that picks one bit-width (variant) per input.

DynaDFQ published no code; the design follows its authors' CADyQ selector (a small head on
cheap per-image descriptors, hard choice forward, soft probabilities backward). Assumptions,
each a parameter: the descriptor (``features``), its resolution and width.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..teacher import _BN_TYPES

FEATURES = ("image", "stem")


def _pooled_stats(x: torch.Tensor) -> torch.Tensor:
    """Per-channel mean and standard deviation over space: a cheap, size-free descriptor."""
    flat = x.flatten(2)
    return torch.cat([flat.mean(2), flat.std(2, unbiased=False)], 1)


def stem_of(model: nn.Module) -> nn.Sequential:
    """The model's first conv, the BatchNorm right after it (if any) and a ReLU: its cheapest
    learned features. Assumes the usual conv-BN-ReLU stem; pass ``stem=`` to BitSelector otherwise."""
    modules = list(model.named_modules())
    for i, (_, m) in enumerate(modules):
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            parts: list[nn.Module] = [copy.deepcopy(m)]
            if i + 1 < len(modules) and isinstance(modules[i + 1][1], _BN_TYPES):
                parts.append(copy.deepcopy(modules[i + 1][1]))
            return nn.Sequential(*parts, nn.ReLU())
    raise ValueError("the model has no conv layer to take a stem from; use BitSelector(features='image')")


class BitSelector(nn.Module):
    """Scores each candidate bit-width for each input; ``forward`` returns logits (N, choices).

    ``features="image"``: two strided 3x3 convs on the image average-pooled to ``resolution``
    pixels, then pooled statistics and a linear head (about 30k MACs on 32x32 RGB).
    ``features="stem"``: the frozen first conv-BN-ReLU of the FP model (``stem_of``) on the image
    pooled to ``resolution``, pooled statistics, a two-layer head. Both learn from scratch on
    synthetic images; only the head (and the image convs) train.
    """

    def __init__(self, in_channels: int, num_choices: int, *, features: str = "image", resolution: int = 16,
                 width: int = 8, hidden: int = 32, stem: nn.Module | None = None) -> None:
        super().__init__()
        if features not in FEATURES:
            raise ValueError(f"features={features!r}: choose one of {FEATURES}")
        if num_choices < 2:
            raise ValueError("a bit selector needs at least two candidate bit-widths")
        self.features, self.num_choices = features, num_choices
        self.pool = nn.AdaptiveAvgPool2d(resolution)
        if features == "image":
            self.body = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
            self.head = nn.Linear(4 * width, num_choices)
        else:
            if stem is None:
                raise ValueError("features='stem' needs stem=stem_of(model)")
            self.body = stem
            for p in self.body.parameters():
                p.requires_grad_(False)
            channels = self.body(torch.zeros(2, in_channels, resolution, resolution)).shape[1]
            self.head = nn.Sequential(nn.Linear(2 * channels, hidden), nn.ReLU(), nn.Linear(hidden, num_choices))
        # descriptor statistics differ in scale by orders of magnitude; standardise them
        self.norm = nn.BatchNorm1d(self.head.in_features if isinstance(self.head, nn.Linear)
                                   else self.head[0].in_features, affine=False)

    def train(self, mode: bool = True) -> BitSelector:
        super().train(mode)
        if self.features == "stem":
            self.body.eval()  # a frozen stem keeps its BatchNorm statistics
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(_pooled_stats(self.body(self.pool(x)))))
