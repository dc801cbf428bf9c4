"""What the teacher sees of the images at each synthesis step: smoothing, crop, flip, shift.

One random draw per batch and step (as IntraQ's batch-tensor transforms do): cheap, and the
per-image variety comes from the many steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def gaussian_kernel(size: int, sigma: float, channels: int) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    k1 = torch.exp(-(ax**2) / (2 * sigma**2))
    k2 = torch.outer(k1, k1)
    return (k2 / k2.sum()).expand(channels, 1, size, size).contiguous()


def smooth(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    pad = kernel.shape[-1] // 2
    return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), kernel, groups=x.shape[1])


def random_resized_crop(x: torch.Tensor, g: torch.Generator, scale: tuple[float, float],
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """One RandomResizedCrop draw for the whole batch, resized back to the input size (bilinear)."""
    h, w = x.shape[-2:]
    area = h * w
    for _ in range(10):  # torchvision's rejection sampling, then the centre-crop fallback
        target = area * float(scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=g))
        log_r = torch.log(torch.tensor(ratio))
        aspect = float(torch.exp(log_r[0] + (log_r[1] - log_r[0]) * torch.rand((), generator=g)))
        cw, ch = round((target * aspect) ** 0.5), round((target / aspect) ** 0.5)
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=g))
            left = int(torch.randint(0, w - cw + 1, (), generator=g))
            break
    else:
        ch, cw, top, left = h, w, 0, 0
    crop = x[..., top:top + ch, left:left + cw]
    if (ch, cw) == (h, w):
        return crop
    return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)


@dataclass
class SynthesisAugment:
    """The per-step image pipeline. ``crop_scale < 1`` turns on RandomResizedCrop(scale=(crop_scale, 1));
    ``prob`` gates crop and flip together (IntraQ: 0.5); ``jitter`` is a random roll of up to that many
    pixels (-1: 1/16 of the width)."""

    smoothing: bool = False
    smoothing_sigma: float = 1.25
    flip: bool = False
    jitter: int = 0
    crop_scale: float = 1.0
    prob: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.crop_scale <= 1.0:
            raise ValueError(f"crop_scale={self.crop_scale} must be in (0, 1]")
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"augmentation prob={self.prob} must be in [0, 1]")
        self._kernel: torch.Tensor | None = None

    def kernel(self, channels: int) -> torch.Tensor | None:
        if not self.smoothing:
            return None
        if self._kernel is None or self._kernel.shape[0] != channels:
            self._kernel = gaussian_kernel(3, self.smoothing_sigma, channels)
        return self._kernel

    def finalize(self, x: torch.Tensor) -> torch.Tensor:
        """The stored image: smoothed like the teacher saw it, without the random parts."""
        k = self.kernel(x.shape[1])
        if k is not None and k.device != x.device:
            k = self._kernel = k.to(x.device)
        return smooth(x, k) if k is not None else x

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        view = self.finalize(x)
        gated = self.prob >= 1.0 or bool(torch.rand((), generator=g) < self.prob)
        if gated and self.crop_scale < 1.0:
            view = random_resized_crop(view, g, (self.crop_scale, 1.0))
        if gated and self.flip and torch.rand((), generator=g) < 0.5:
            view = view.flip(3)
        jitter = self.jitter if self.jitter >= 0 else max(1, x.shape[-1] // 16)
        if jitter:
            dx, dy = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=g))
            if dx or dy:
                view = torch.roll(view, shifts=(dy, dx), dims=(2, 3))
        return view


__all__ = ["SynthesisAugment", "gaussian_kernel", "random_resized_crop", "smooth"]
