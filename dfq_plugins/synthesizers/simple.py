"""Baselines that need no optimisation: Gaussian noise and the user's real data."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import CalibrationSet
from ..teacher import Teacher
from .base import Synthesizer, seeded_generator


@dataclass
class NoiseSynthesizer(Synthesizer):
    """N(mean, std^2) in the model's normalised input space, optionally clipped to valid pixels."""

    name = "noise"
    mean: float = 0.0
    std: float = 1.0
    clip: bool = False

    def synthesize(self, teacher: Teacher, num_samples: int, *, seed: int = 0, batch_size: int = 32,
                   progress: bool = True, workdir: Path | None = None) -> CalibrationSet:
        g = seeded_generator(seed)
        x = torch.randn((num_samples, *teacher.spec.shape), generator=g) * self.std + self.mean
        if self.clip:
            x = teacher.spec.clip(x)
        return self.finish(teacher, x, seed, batch_size)


@dataclass
class RealSynthesizer(Synthesizer):
    """The user's own images (already normalised), sampled by seed: the upper-bound baseline.

    ``data`` is a tensor (N, C, H, W), a pair (images, labels), or any object with ``images``
    and ``labels`` attributes (e.g. a model plugin's calibration pool).
    """

    name = "real"
    cacheable = False
    data: Any = field(default=None, repr=False)

    def config_dict(self) -> dict[str, Any]:
        return {"data": getattr(self.data, "name", type(self.data).__name__)}

    def synthesize(self, teacher: Teacher, num_samples: int, *, seed: int = 0, batch_size: int = 32,
                   progress: bool = True, workdir: Path | None = None) -> CalibrationSet:
        if self.data is None:
            raise ValueError("source 'real' needs data=: a tensor of normalised images, (images, labels), "
                             "or a model plugin's calibration pool")
        if isinstance(self.data, torch.Tensor):
            images, labels = self.data, None
        elif isinstance(self.data, (tuple, list)):
            images, labels = self.data
        else:
            images, labels = self.data.images, self.data.labels
        if images.shape[0] < num_samples:
            raise ValueError(f"source 'real' has {images.shape[0]} images, fewer than the {num_samples} asked for")
        if tuple(images.shape[1:]) != tuple(teacher.spec.shape):
            raise ValueError(f"real images have shape {tuple(images.shape[1:])}, "
                             f"the model expects {teacher.spec.shape}")
        idx = torch.randperm(images.shape[0], generator=seeded_generator(seed))[:num_samples]
        return self.finish(teacher, images[idx].float(), seed, batch_size,
                           labels=None if labels is None else labels[idx].long())
