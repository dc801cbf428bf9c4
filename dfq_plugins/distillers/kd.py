"""``kd``: the GDFQ/IntraQ fine-tuning loss, on an offline set or an online GDFQ generator.

Student loss: ``kd_weight * T^2 * KL(p_P^T || p_Q^T) + ce_weight * CE(z_Q, y)``. GDFQ used
``reduction="mean"`` with weight 1; IntraQ, HAST and DiffDFQ use ``batchmean`` with weight 20;
T = 20 in both (``recipes/published/``). Those weights suit their LR of 1e-4 to 1e-6 over tens of
thousands of steps; on a CPU budget of about a thousand steps they blow a calibrated W4A4
student up (gradient norms of ~500 on ResNet-20), so the defaults are T = 1, weight 1, LR 1e-3. ``y`` is the teacher's prediction by default, or the set's
own (intended) labels with ``labels="set"``.

``online=True`` is GDFQ: a conditional generator trained each step on CE(P(G(z, y)), y) plus
``bns_weight`` x the BN-statistics loss (MSE of batch mean and variance against P's running
statistics), the student trained on its detached images.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..config import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Bound
from ..losses import kd_loss
from ..synthesizers.bn_stats import (
    BNStatsLoss,
    BNStatsRecorder,
    batchnorm_modules,
    running_targets,
)
from .base import Distiller
from .batches import AUGMENTATIONS, sample_batch
from .generator import ConditionalGenerator
from .loop import LossValue, TrainingRun

LABEL_SOURCES = ("teacher", "set")


@dataclass
class KDDistiller(Distiller):
    name: ClassVar[str] = "kd"

    temperature: float = 1.0
    kd_weight: float = 1.0
    reduction: str = "batchmean"
    ce_weight: float = 1.0
    labels: str = "teacher"
    augment: str = "shift_flip"
    online: bool = False
    generator_lr: float = 1e-3
    bns_weight: float = 0.1
    latent_dim: int = 100
    generator_width: int = 128
    extra_bounds: ClassVar[dict[str, Bound]] = {
        "temperature": POSITIVE, "kd_weight": NON_NEGATIVE, "ce_weight": NON_NEGATIVE,
        "generator_lr": POSITIVE, "bns_weight": NON_NEGATIVE, "latent_dim": AT_LEAST_ONE, "generator_width": AT_LEAST_ONE}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.labels not in LABEL_SOURCES:
            raise ValueError(f"labels={self.labels!r}; choose one of {LABEL_SOURCES}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment={self.augment!r}; choose one of {AUGMENTATIONS}")

    def requires_source(self) -> bool:
        return not self.online

    # -- shared by the KD-style distillers -------------------------------------------------------
    def student_loss(self, z_q: torch.Tensor, z_p: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        kd = self.kd_weight * kd_loss(z_q, z_p, self.temperature, self.reduction)
        target = z_p.argmax(1) if y is None or self.labels == "teacher" else y
        ce = F.cross_entropy(z_q, target) if self.ce_weight else z_q.new_zeros(())
        return kd + self.ce_weight * ce, {"kd": kd.detach(), "ce": ce.detach()}

    def setup_generator(self, run: TrainingRun, style_dim: int = 0) -> None:
        spec = run.teacher.spec
        if spec.num_classes is None:
            raise ValueError("an online generator needs the number of classes: set InputSpec.num_classes")
        bns = batchnorm_modules(run.teacher.model)
        if not bns:
            raise ValueError(f"distiller {self.name!r} trains its generator on BatchNorm statistics and the "
                             "teacher has none; use kd on an offline set from a BN-free source (noise, real)")
        gen = ConditionalGenerator(spec.num_classes, tuple(spec.shape), self.latent_dim, self.generator_width,
                                   style_dim=style_dim)
        run.add_generator("generator", gen, self.generator_lr)
        self._recorder = BNStatsRecorder(bns, statistic="var")
        self._targets = running_targets(bns, statistic="var")
        self._bns = BNStatsLoss(distance="mse", layer_weighting="average")

    def reset_ranges(self, run: TrainingRun) -> None:
        """Let the generator's images set the activation ranges during the observer window."""
        if run.keeps_ranges:  # an earlier stage learned them (reconstruct+adadfq): resetting would discard them
            return
        if run.toolchain.reset_observers(run.student) == 0 and run.ranges != "learned":
            warnings.warn(f"{run.toolchain.name}'s student has no range observers to reset: its ranges stay as "
                          "calibrated on the source set. Pass ranges='learned' to adapt them to the generator.",
                          stacklevel=3)

    def setup(self, run: TrainingRun) -> None:
        if self.online:
            self.setup_generator(run)
        else:
            self._images = run.source.images
            self._labels = run.source.labels

    def generator_images(self, run: TrainingRun, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = run.rng(step, salt=1)
        gen = run.trainables["generator"].module.train()
        y = torch.randint(0, run.teacher.spec.num_classes, (self.batch_size,), generator=g)
        z = torch.randn(self.batch_size, gen.code_dim(), generator=g)
        y, z = run.share(y).to(run.device), run.share(z).to(run.device)  # this rank's rows of the global batch
        return gen(z, y), y

    def gdfq_generator_step(self, run: TrainingRun, x: torch.Tensor, y: torch.Tensor,
                            losses: dict[str, LossValue],
                            extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """GDFQ's generator update, CE(P(x), y) + bns_weight * BNS (+ ``extra``, a subclass's own
        generator term, already weighted); returns detached (x, z_P)."""
        with self._recorder.record():
            z_p = run.teacher(x)
        g_ce = F.cross_entropy(z_p, y)
        g_bns = self._bns(self._recorder.stats, self._targets)
        loss = g_ce + self.bns_weight * g_bns
        run.update("generator", loss if extra is None else loss + extra)
        losses.update({"g_ce": g_ce.detach(), "g_bns": g_bns.detach()})
        return x.detach(), z_p.detach()

    def train_step(self, run: TrainingRun, step: int) -> dict[str, LossValue]:
        losses: dict[str, LossValue] = {}
        if self.online:
            x, y = self.generator_images(run, step)
            x, z_p = self.gdfq_generator_step(run, x, y, losses)
        else:
            x, (y,) = sample_batch(self._images, self.batch_size, run.rng(step), self.augment, (self._labels,),
                                   device=run.device)
            x, y = run.share(x), None if y is None else run.share(y)
            z_p = run.teacher_logits(x)
        loss, parts = self.student_loss(run.student(x), z_p, y)
        run.update_student(loss)
        losses.update(parts)
        return losses


@dataclass
class OnlineDistiller(KDDistiller):
    """Shared by the distillers that bring their own generator (AdaDFQ, Causal-DFQ).

    The student starts from the activation ranges its toolchain calibrated on the source set and
    keeps them (no reset, no observer window); on a short budget the observers then keep following
    the generator (``ranges="observe"``; frozen ranges cost 15 points in probes). Resetting them to
    the generator's images (``recalibrate=True, observer_steps=100``, AdaDFQ's code and our default
    until 2026-12-07) threw away a histogram-calibrated start: 1.5 to 14 points on ResNet-20/56 W4A4
    PT2E, level on FX (docs/claims.md, "The online loops lost their start").
    """

    # 24 student steps ended far under the start, 100 above it: fewer warn (docs/distillation.md, "Short budgets")
    short_budget_steps: ClassVar[int] = 100
    online: bool = True
    warmup_steps: int = 100
    observer_steps: int = 0
    ranges: str = "observe"
    recalibrate: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.online:
            raise ValueError(f"{self.name} always trains its own generator (online=True)")

    def generator_style_dim(self) -> int:
        """Size of a separate style code (0: GDFQ's label embedding times z)."""
        return 0

    def setup(self, run: TrainingRun) -> None:
        self.setup_generator(run, style_dim=self.generator_style_dim())
        if self.recalibrate:  # a resumed run restores its observers from the checkpoint
            self.reset_ranges(run)


@dataclass
class GDFQDistiller(OnlineDistiller):
    """GDFQ (Xu et al. 2020) as the online baseline of AdaDFQ and Causal-DFQ.

    ``kd``'s loss on a GDFQ generator with the same warm-up, observer and range handling as
    ``adadfq`` and ``causal``, so that a row of each differs only in what the papers add.
    """

    name: ClassVar[str] = "gdfq"
