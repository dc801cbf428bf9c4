"""The bit selector: a tiny network that picks one bit-width (variant) per input.

DynaDFQ published no code; the design follows its authors' CADyQ selector (a small head on
cheap per-image descriptors, hard choice forward, soft probabilities backward). Assumptions,
each a parameter: the descriptor (``features``), its resolution and width.

On ResNet-20 / CIFAR-10 no descriptor taken before the network's last stage tells an image the
cheapest variant gets right from one it gets wrong (``tools/selector_probe.py``: area under the ROC
curve 0.49 to 0.60 for pooled pixels, stem, stage 1 and 2 features, even fitted on real images; 0.87
for the cheapest variant's own output). ``OutputSelector`` therefore reads the cheapest variant's
logits: every input runs it, and the selector decides which dearer variant, if any, to run next.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..teacher import _BN_TYPES

FEATURES = ("image", "stem")  # BitSelector's; "output" is OutputSelector


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
        if features == "output":
            raise ValueError("features='output' reads the cheapest variant's logits: use OutputSelector")
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


def output_descriptor(logits: torch.Tensor, top: int = 3) -> torch.Tensor:
    """What a prediction says about its own difficulty: entropy, the ``top`` largest
    probabilities and the margin between the first two. Class-free, so it transfers across classes."""
    p = torch.softmax(logits.float(), -1)
    ranked = p.topk(min(top, p.shape[-1]), -1).values
    ent = -(p * p.clamp_min(1e-12).log()).sum(-1, keepdim=True)
    return torch.cat([ent, ranked, ranked[:, :1] - ranked[:, 1:2]], 1)


class OutputSelector(nn.Module):
    """Scores each candidate for an input from the cheapest variant's logits on it (N, classes)
    -> (N, choices). Choice 0 keeps the cheapest variant's answer; choice k > 0 runs variant k
    as well (``EscalationRouter``). A learned, one-step version of the entropy cascade: it may
    jump straight to the dearest variant instead of paying for every stage on the way.

    ``hidden=0`` (default): a linear head on the standardised descriptor. On ResNet-20 a 16-unit
    hidden layer gained +1.6 above the fixed-bit line with one seed and lost 1.1 with the other;
    the linear head gained 2.4 and 2.5 (docs/dynamic.md)."""

    def __init__(self, num_choices: int, *, hidden: int = 0, top: int = 3) -> None:
        super().__init__()
        if num_choices < 2:
            raise ValueError("a bit selector needs at least two candidate bit-widths")
        self.features, self.num_choices, self.top = "output", num_choices, top
        width = top + 2
        self.norm = nn.BatchNorm1d(width, affine=False)
        self.head = nn.Linear(width, num_choices) if hidden == 0 else \
            nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, num_choices))
        if hidden == 0:
            self._start_from_the_cascade()

    @torch.no_grad()
    def _start_from_the_cascade(self) -> None:
        """Start where the entropy cascade is: keep the cheap answer unless its entropy is more than
        one standard deviation above the mean. From a random start 2 of 5 seeds on ResNet-20 learned
        the reverse (escalating the confident inputs, 8 points under the fixed-bit line); from this
        one 10 of 10 runs ended 2.1 to 2.7 above it."""
        self.head.weight.zero_()
        self.head.bias.zero_()
        self.head.bias[0] = 1.0
        self.head.weight[1:, 0] = 1.0  # column 0 of the descriptor is the entropy

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2:
            raise ValueError(f"OutputSelector reads the cheapest variant's logits (N, classes), got shape "
                             f"{tuple(logits.shape)}")
        return self.head(self.norm(output_descriptor(logits, self.top)))
