"""BatchNorm-statistics inversion (ZeroQ, with the knobs of Sony MCT's data generation).

Pixels are optimised so that the batch statistics of every BN layer's input match the BN's
running statistics. What keeps the images useful for low-bit calibration (a careless
inversion is worse than noise at 4 bits): clipping to the range real pixels can take, a
smoothing + flip + jitter image pipeline, and a plateau LR schedule.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import CalibrationSet
from ..errors import MissingBatchNormError
from ..losses import channel_stats
from ..progress import progress_bar
from ..teacher import Teacher
from .base import Synthesizer, batches_of, resumable_batches, seeded_generator

INITS = ("gaussian", "diverse")
OPTIMIZERS = ("adam", "radam")
SCHEDULERS = ("reduce_on_plateau", "step", "cosine", "none")
LAYER_WEIGHTINGS = ("average", "first_layer_multiplier")
STATISTICS = ("std", "var")
OUTPUT_LOSSES = ("none", "negative_min_max_diff")
LABEL_FREE_SOURCES = "noise, real"


def gaussian_kernel(size: int, sigma: float, channels: int) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    k1 = torch.exp(-(ax**2) / (2 * sigma**2))
    k2 = torch.outer(k1, k1)
    return (k2 / k2.sum()).expand(channels, 1, size, size).contiguous()


@dataclass
class ZeroQSynthesizer(Synthesizer):
    """BN-statistics inversion. Every field is a knob; defaults are a CPU-friendly recipe."""

    name = "zeroq"
    needs_batchnorm = True
    speed_only_fields = ("channels_last",)
    has_optimization_loop = True
    version = 2  # 2: channel statistics from contiguous reductions (numerically different from var_mean)
    iterations: int = 200
    lr: float = 0.25
    optimizer: str = "adam"
    scheduler: str = "reduce_on_plateau"
    plateau_patience: int = 25
    init: str = "gaussian"
    statistic: str = "std"
    layer_weighting: str = "average"
    first_layer_multiplier: float = 10.0
    input_stats_weight: float = 0.0
    output_loss: str = "none"
    output_loss_weight: float = 1e-5
    smoothing: bool = True
    smoothing_sigma: float = 1.25
    flip: bool = True
    jitter: int = -1  # pixels of random shift per step; -1: 1/16 of the image size
    clip: bool = True
    synthesis_batch_size: int = 128
    channels_last: bool | None = None  # None: on for images of 64x64 and larger (1.33x on Lite0 at 224)

    def __post_init__(self) -> None:
        for field_name, allowed in (("init", INITS), ("optimizer", OPTIMIZERS), ("scheduler", SCHEDULERS),
                                    ("layer_weighting", LAYER_WEIGHTINGS), ("statistic", STATISTICS),
                                    ("output_loss", OUTPUT_LOSSES)):
            if getattr(self, field_name) not in allowed:
                raise ValueError(f"zeroq {field_name}={getattr(self, field_name)!r}; choose one of {allowed}")
        if self.iterations < 1:
            raise ValueError("zeroq iterations must be at least 1")

    # ---------------------------------------------------------------------------------------
    def synthesize(self, teacher: Teacher, num_samples: int, *, seed: int = 0, batch_size: int = 32,
                   progress: bool = True, workdir: Path | None = None) -> CalibrationSet:
        bns = teacher.bn_layers()
        if not bns:
            raise MissingBatchNormError(
                f"zeroq inverts BatchNorm statistics, but {type(teacher.model).__name__} has no BatchNorm layer. "
                f"Use a source that needs no BN statistics: {LABEL_FREE_SOURCES}."
            )
        sizes = batches_of(num_samples, self.synthesis_batch_size)
        bar = progress_bar(total=len(sizes) * self.iterations, desc=f"zeroq {num_samples} images",
                           enabled=progress, unit="it")
        try:
            with self.teacher_layout(teacher):
                parts = resumable_batches(sizes, workdir,
                                          lambda i, n: self.optimize_batch(teacher, n, seed, i, bar))
        finally:
            bar.close()
        return self.finish(teacher, torch.cat(parts).contiguous(), seed, batch_size)

    def uses_channels_last(self, spec) -> bool:
        if self.channels_last is None:
            return spec.shape[-1] * spec.shape[-2] >= 64 * 64
        return self.channels_last

    @contextlib.contextmanager
    def teacher_layout(self, teacher: Teacher):
        """Run the teacher channels-last (mkldnn's fast path for depthwise convs), then restore it."""
        if not self.uses_channels_last(teacher.spec):
            yield
            return
        teacher.model.to(memory_format=torch.channels_last)
        try:
            yield
        finally:
            teacher.model.to(memory_format=torch.contiguous_format)

    def _targets(self, teacher: Teacher) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        means, spreads = [], []
        for _, bn in teacher.bn_layers():
            var = bn.running_var.detach().float()
            means.append(bn.running_mean.detach().float())
            spreads.append(torch.sqrt(var + bn.eps) if self.statistic == "std" else var)
        w = torch.ones(len(means))
        if self.layer_weighting == "first_layer_multiplier":
            w[0] = self.first_layer_multiplier
        return means, spreads, w / w.sum()

    def _init_images(self, n: int, teacher: Teacher, g: torch.Generator) -> torch.Tensor:
        shape = (n, *teacher.spec.shape)
        x = torch.randn(shape, generator=g)
        if self.init == "diverse":  # random per-image channel means/stds, then a box blur
            c = shape[1]
            x = x * torch.rand((n, c, 1, 1), generator=g) + (torch.rand((n, c, 1, 1), generator=g) * 2 - 1)
            x = F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
        return x

    def optimize_batch(self, teacher: Teacher, n: int, seed: int, index: int, bar) -> torch.Tensor:
        g = seeded_generator(seed, salt=index + 1)
        spec = teacher.spec
        lo, hi = spec.bounds()
        x = self._init_images(n, teacher, g)
        if self.clip:
            x = spec.clip(x)
        if self.uses_channels_last(spec):
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        opt_cls = torch.optim.Adam if self.optimizer == "adam" else torch.optim.RAdam
        opt = opt_cls([x], lr=self.lr)
        sched = self._scheduler(opt)
        means, spreads, weights = self._targets(teacher)
        kernel = gaussian_kernel(3, self.smoothing_sigma, spec.channels) if self.smoothing else None
        jitter = self.jitter if self.jitter >= 0 else max(1, spec.shape[-1] // 16)
        stats: list[torch.Tensor] = [torch.zeros(())] * len(means)
        use_std = self.statistic == "std"

        def capture(i: int, inp: torch.Tensor) -> None:
            mean, var = channel_stats(inp)
            spread = torch.sqrt(var + 1e-5) if use_std else var
            stats[i] = (mean - means[i]).pow(2).sum() + (spread - spreads[i]).pow(2).sum()

        modules = [m for _, m in teacher.bn_layers()]
        with teacher.forward_pre_hooks(modules, capture):
            for step in range(self.iterations):
                opt.zero_grad(set_to_none=True)
                view = self._pipeline(x, kernel, jitter, g)
                out = teacher(view)
                loss = (torch.stack(stats) * weights).sum()
                if self.input_stats_weight:
                    v, m = torch.var_mean(view, dim=(0, 2, 3), unbiased=False)
                    loss = loss + self.input_stats_weight * (m.pow(2).sum() + (v.sqrt() - 1).pow(2).sum())
                if self.output_loss == "negative_min_max_diff":
                    top2 = out.topk(2, dim=1).values
                    loss = loss - self.output_loss_weight * (top2[:, 0] - top2[:, 1]).mean()
                loss.backward()
                opt.step()
                if self.clip:
                    with torch.no_grad():
                        x.clamp_(lo, hi)
                if sched is not None:
                    sched.step(loss.detach()) if self.scheduler == "reduce_on_plateau" else sched.step()
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(batch=index, bn_loss=f"{loss.item():.4f}", lr=f"{opt.param_groups[0]['lr']:.3g}")
        with torch.no_grad():
            final = x.detach()
            if kernel is not None:
                final = self._smooth(final, kernel)
            return spec.clip(final) if self.clip else final

    def _scheduler(self, opt: torch.optim.Optimizer):
        if self.scheduler == "reduce_on_plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=self.plateau_patience,
                                                              min_lr=1e-4)
        if self.scheduler == "step":
            return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, self.iterations // 3), gamma=0.5)
        if self.scheduler == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.iterations)
        return None

    @staticmethod
    def _smooth(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        pad = kernel.shape[-1] // 2
        return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), kernel, groups=x.shape[1])

    def _pipeline(self, x: torch.Tensor, kernel: torch.Tensor | None, jitter: int,
                  g: torch.Generator) -> torch.Tensor:
        """What the teacher sees this step: smoothed, randomly flipped and shifted images."""
        view = self._smooth(x, kernel) if kernel is not None else x
        if self.flip and torch.rand((), generator=g) < 0.5:
            view = view.flip(3)
        if jitter:
            dx, dy = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=g))
            if dx or dy:
                view = torch.roll(view, shifts=(dy, dx), dims=(2, 3))
        return view

