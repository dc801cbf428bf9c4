"""Genie-D (Jeon, Lee, Kim; CVPR 2023): a small generator and its latent codes, per batch.

For every batch a fresh generator and a batch of latent codes are optimised jointly against
label-free BN statistics (batch std, not var; distance summed over channels / C) plus the
input's statistics. "Swing convolution": every strided convolution of the teacher sees its
input shifted by a random reflect-padded +-1 pixel each step, against checkerboard artefacts.
Published: 4000 steps per batch of 128, Adam lr 0.1 on the codes (plateau, patience 100) and
0.01 on the generator (x0.95 every 100 steps).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..teacher import Teacher
from .canvas import make_optimizer, make_scheduler, step_scheduler
from .optimizing import OptimizingSynthesizer


class GenieGenerator(nn.Module):
    """z -> Linear -> 128 x H/4 x W/4 -> BN -> up -> conv 64 -> BN -> LReLU -> up -> conv C -> tanh -> BN."""

    def __init__(self, latent_dim: int, shape: tuple[int, int, int], width: int = 128) -> None:
        super().__init__()
        c, h, w = shape
        if h % 4 or w % 4:
            raise ValueError(f"the Genie generator needs an image size divisible by 4, got {h}x{w}")
        self.start = (width, h // 4, w // 4)
        self.fc = nn.Linear(latent_dim, width * (h // 4) * (w // 4))
        self.body = nn.Sequential(
            nn.BatchNorm2d(width), nn.Upsample(scale_factor=2), nn.Conv2d(width, width // 2, 3, padding=1),
            nn.BatchNorm2d(width // 2), nn.LeakyReLU(0.2), nn.Upsample(scale_factor=2),
            nn.Conv2d(width // 2, c, 3, padding=1), nn.Tanh(), nn.BatchNorm2d(c, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.fc(z).view(z.shape[0], *self.start))


class GeneratorCanvas:
    """A generator and its latent batch are the parameters; the images are G(z)."""

    def __init__(self, synth: GenieSynthesizer, shape: tuple[int, int, int], n: int, g: torch.Generator,
                 bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
                 device: torch.device | None = None) -> None:
        device = device or torch.device("cpu")
        with torch.random.fork_rng(devices=[]):  # a reproducible init that leaves the global RNG alone
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=g)))
            self.gen = GenieGenerator(synth.latent_dim, shape, synth.generator_width).train().to(device)
        self.z = torch.randn((n, synth.latent_dim), generator=g).to(device).requires_grad_(True)
        self.opt_z = make_optimizer(synth.optimizer, [self.z], synth.lr)
        self.opt_g = make_optimizer(synth.optimizer, list(self.gen.parameters()), synth.generator_lr)
        self.sched_z = make_scheduler(synth.scheduler, self.opt_z, synth.iterations, synth.plateau_patience,
                                      synth.min_lr)
        self.sched_g = torch.optim.lr_scheduler.StepLR(self.opt_g, step_size=synth.generator_lr_step, gamma=0.95)
        self.channels_last = synth.uses_channels_last_shape(shape)
        self.bounds = None if bounds is None else tuple(b.to(device) for b in bounds)

    def render(self) -> torch.Tensor:
        """G(z), clamped to valid pixels inside the graph when clipping is on: otherwise the
        generator learns to meet the BN statistics with a few huge pixels on a flat image,
        which clipping afterwards destroys (measured on TinyNet: max |x| 12)."""
        x = self.gen(self.z)
        if self.bounds is not None:
            x = x.clamp(*self.bounds)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def zero_grad(self) -> None:
        self.opt_z.zero_grad(set_to_none=True)
        self.opt_g.zero_grad(set_to_none=True)

    def step(self, loss: torch.Tensor) -> None:
        self.opt_z.step()
        self.opt_g.step()
        step_scheduler(self.sched_z, loss)
        self.sched_g.step()

    def lr(self) -> float:
        return self.opt_z.param_groups[0]["lr"]

    @torch.no_grad()
    def result(self) -> torch.Tensor:
        return self.render().contiguous()


def strided_convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and max(m.stride) > 1]


@contextlib.contextmanager
def swing_convolutions(model: nn.Module, g: torch.Generator, shift: int = 1):
    """Shift each strided conv's input by a random +-``shift`` pixels (reflect padding) per call."""

    def hook(_m: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if x.shape[-1] <= 2 * shift or x.shape[-2] <= 2 * shift:
            return args
        dy, dx = (int(v) for v in torch.randint(0, 2 * shift + 1, (2,), generator=g))
        padded = F.pad(x, (shift, shift, shift, shift), mode="reflect")
        return (padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]], *args[1:])

    handles = [m.register_forward_pre_hook(hook) for m in strided_convs(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class GenieSynthesizer(OptimizingSynthesizer):
    name = "genie"
    lr: float = 0.1  # the latent codes
    generator_lr: float = 0.01
    generator_lr_step: int = 100
    plateau_patience: int = 100
    latent_dim: int = 256
    generator_width: int = 128
    swing: bool = True
    statistic: str = "std"
    bn_distance: str = "l2_per_channel"
    input_stats_weight: float = 1.0
    smoothing: bool = False
    flip: bool = False
    jitter: int = 0

    def uses_channels_last_shape(self, shape: tuple[int, ...]) -> bool:
        return self.channels_last if self.channels_last is not None else shape[-1] * shape[-2] >= 64 * 64

    def make_canvas(self, teacher: Teacher, n: int, g: torch.Generator) -> Any:
        return GeneratorCanvas(self, teacher.spec.shape, n, g, teacher.spec.bounds() if self.clip else None,
                               teacher.device)

    def optimize_batch(self, teacher: Teacher, n: int, seed: int, index: int, bar: Any,
                       targets: Any = None) -> torch.Tensor:
        if not self.swing:
            return super().optimize_batch(teacher, n, seed, index, bar, targets)
        from .base import seeded_generator

        with swing_convolutions(teacher.model, seeded_generator(seed, salt=400_009 + index)):
            return super().optimize_batch(teacher, n, seed, index, bar, targets)
