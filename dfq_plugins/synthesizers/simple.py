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


def real_images(data: Any, wanted: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, labels or None) from any of the forms ``RealSynthesizer`` accepts. From an iterable
    of batches, reads until it has ``wanted`` images (or the iterable ends)."""
    if isinstance(data, torch.Tensor):
        return data, None
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0], data[1]
    if hasattr(data, "images") and hasattr(data, "labels"):
        return data.images, data.labels
    if not hasattr(data, "__iter__"):
        raise TypeError(f"source 'real' cannot read images from a {type(data).__name__}; pass a tensor, "
                        "(images, labels), or a DataLoader of images or (images, labels)")
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    for batch in data:
        if isinstance(batch, (tuple, list)):  # (images, labels), or [images] from a TensorDataset of images
            x, y = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            x, y = batch, None
        if isinstance(x, dict) or not isinstance(x, torch.Tensor):
            raise TypeError(f"source 'real': a batch of the iterable is a {type(x).__name__}; it should be an image "
                            "tensor (N, C, H, W) or (images, labels)")
        xs.append(x.detach().cpu())
        if isinstance(y, torch.Tensor):
            ys.append(y.detach().cpu())
        if sum(t.shape[0] for t in xs) >= wanted:
            break
    if not xs:
        raise ValueError("source 'real': the data iterable yielded no batches")
    images = torch.cat(xs)
    labels = torch.cat(ys) if len(ys) == len(xs) else None
    return images, labels


@dataclass
class RealSynthesizer(Synthesizer):
    """The user's own images (already normalised), sampled by seed: the upper-bound baseline.

    ``data`` is a tensor (N, C, H, W), a pair (images, labels), any object with ``images``
    and ``labels`` attributes (e.g. a model plugin's calibration pool), or an iterable of batches
    such as a ``torch.utils.data.DataLoader`` yielding images or (images, labels).
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
        images, labels = real_images(self.data, num_samples)
        if images.shape[0] < num_samples:
            raise ValueError(f"source 'real' has {images.shape[0]} images, fewer than the {num_samples} asked for")
        if tuple(images.shape[1:]) != tuple(teacher.spec.shape):
            raise ValueError(f"real images have shape {tuple(images.shape[1:])}, "
                             f"the model expects {teacher.spec.shape}")
        idx = torch.randperm(images.shape[0], generator=seeded_generator(seed))[:num_samples]
        return self.finish(teacher, images[idx].float(), seed, batch_size,
                           labels=None if labels is None else labels[idx].long())
