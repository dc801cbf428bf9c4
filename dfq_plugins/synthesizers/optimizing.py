"""The synthesis loop every optimisation-based method shares (ZeroQ, IntraQ, HAST, Genie, DynaDFQ).

A method is a set of knobs plus up to four small overrides: which targets a batch aims at
(``batch_targets``), its task loss on the teacher's output (``task_loss``), what it learns
from a finished batch (``after_batch``), and what is optimised (``make_canvas``: pixels by
default, a generator and its latent codes for Genie). Everything else lives here once: BN
statistics hooks and loss, augmentation, optimiser and plateau schedule, clipping, early
stop on a loss plateau, the optional quantization-aware BN term, per-batch resume and progress.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .. import distributed
from ..data import CalibrationSet
from ..errors import MissingBatchNormError
from ..progress import progress_bar
from ..teacher import TEACHER_PRECISIONS, Teacher
from .augment import SynthesisAugment
from .base import Synthesizer, batches_of, resumable_batches, seeded_generator
from .bn_stats import (
    BNStatsLoss,
    BNStatsRecorder,
    batchnorm_modules,
    detached,
    running_targets,
)
from .canvas import Canvas, PixelCanvas
from .labels import Targets
from .whole_set import optimize_jointly

INITS = ("gaussian", "diverse")
OPTIMIZERS = ("adam", "radam")
SCHEDULERS = ("reduce_on_plateau", "step", "cosine", "none")
LABEL_FREE_SOURCES = "noise, real"
BN_SCOPES = ("batch", "set")


@dataclass
class OptimizingSynthesizer(Synthesizer):
    """Base of the BN-inversion family. Every field is a knob (see each method's defaults)."""

    needs_batchnorm = True
    has_optimization_loop = True
    speed_only_fields: ClassVar[tuple[str, ...]] = ("channels_last",)
    wants_features: ClassVar[bool] = False  # True: task_loss gets the classifier's input features
    omit_at_default: ClassVar[tuple[str, ...]] = (  # the knobs zeroq gained when the family loop was shared
        "min_lr", "early_stop_patience", "early_stop_delta", "bn_distance", "bn_per_sample", "bn_margin",
        "bn_weight", "crop_scale", "augment_prob", "qaware_toolchain", "qaware_scheme", "qaware_weight", "qaware_every",
        "bn_scope", "teacher_precision")
    batches_independent: ClassVar[bool] = True  # False: a batch depends on earlier ones (IntraQ's memory)
    # optimisation
    iterations: int = 200
    lr: float = 0.25
    optimizer: str = "adam"
    scheduler: str = "reduce_on_plateau"
    plateau_patience: int = 25
    min_lr: float = 1e-4
    early_stop_patience: int = 0  # stop a batch after this many steps without relative improvement (0: off)
    early_stop_delta: float = 1e-3
    init: str = "gaussian"
    clip: bool = True
    synthesis_batch_size: int = 128
    channels_last: bool | None = None  # None: on for images of 64x64 and larger (1.33x on Lite0 at 224)
    teacher_precision: str = "fp32"  # "bf16": the teacher's forward under bfloat16 autocast (for GPUs; changes the set)
    # BN statistics
    statistic: str = "std"
    bn_distance: str = "l2"
    bn_per_sample: bool = False
    layer_weighting: str = "average"
    first_layer_multiplier: float = 10.0
    bn_margin: float = 0.0
    bn_weight: float = 1.0
    input_stats_weight: float = 0.0
    bn_scope: str = "batch"  # batch: each batch matches the BN statistics; set: the whole set does, jointly
    # augmentation of the teacher's view
    smoothing: bool = True
    smoothing_sigma: float = 1.25
    flip: bool = True
    jitter: int = -1  # pixels of random shift per step; -1: 1/16 of the image size
    crop_scale: float = 1.0  # < 1: RandomResizedCrop(scale=(crop_scale, 1))
    augment_prob: float = 1.0
    # quantization-aware BN term (DiffDFQ): a toolchain's student matched to the teacher's batch stats
    qaware_toolchain: str | None = None
    qaware_scheme: str = "w4a4"
    qaware_weight: float = 0.0
    qaware_every: int = 1  # apply the term every k-th step (the fake-quant student costs ~3x the teacher on CPU)

    def __post_init__(self) -> None:
        for field_name, allowed in (("init", INITS), ("optimizer", OPTIMIZERS), ("scheduler", SCHEDULERS)):
            if getattr(self, field_name) not in allowed:
                raise ValueError(f"{self.name} {field_name}={getattr(self, field_name)!r}; choose one of {allowed}")
        if self.iterations < 1:
            raise ValueError(f"{self.name} iterations must be at least 1")
        if self.synthesis_batch_size < 1:
            raise ValueError(f"{self.name} synthesis_batch_size must be at least 1")
        if self.qaware_every < 1:
            raise ValueError(f"{self.name} qaware_every must be at least 1")
        if self.teacher_precision not in TEACHER_PRECISIONS:
            raise ValueError(f"{self.name} teacher_precision={self.teacher_precision!r}; choose one of "
                             f"{TEACHER_PRECISIONS}")
        if self.bn_scope not in BN_SCOPES:
            raise ValueError(f"{self.name} bn_scope={self.bn_scope!r}; choose one of {BN_SCOPES}")
        if self.bn_scope == "set":
            clash = [k for k, on in (("bn_per_sample", self.bn_per_sample), ("early_stop_patience",
                     self.early_stop_patience), ("qaware_weight", self.qaware_weight)) if on]
            if clash:
                raise ValueError(f"{self.name} bn_scope='set' optimises the whole set together and cannot be "
                                 f"combined with {', '.join(clash)}; turn those off or use bn_scope='batch'")
        if self.qaware_weight and not self.qaware_toolchain:
            raise ValueError(f"{self.name}: qaware_weight needs qaware_toolchain (e.g. 'torch-ao-fx')")
        self.bn_loss = BNStatsLoss(self.bn_distance, self.layer_weighting, self.first_layer_multiplier,
                                   self.bn_margin)
        self.augment = SynthesisAugment(self.smoothing, self.smoothing_sigma, self.flip, self.jitter,
                                        self.crop_scale, self.augment_prob)
        self._student: Any = None

    # -- overridable parts ----------------------------------------------------------------
    def prepare(self, teacher: Teacher, seed: int) -> None:
        """Per-run state (class similarity, feature memory, ...); called before the first batch."""

    def batch_targets(self, teacher: Teacher, n: int, seed: int, index: int) -> Targets | None:
        """What batch ``index`` aims at; must be a pure function of (seed, index) for resume."""
        return None

    def task_loss(self, logits: torch.Tensor, features: torch.Tensor | None,
                  targets: Targets | None) -> dict[str, torch.Tensor]:
        return {}

    def after_batch(self, teacher: Teacher, images: torch.Tensor, targets: Targets | None) -> None:
        """Learn from a finished (or resumed) batch, e.g. update the class-centre memory."""

    def make_canvas(self, teacher: Teacher, n: int, g: torch.Generator) -> Canvas:
        spec = teacher.spec
        x = self._init_images(n, spec.shape, g).to(teacher.device)  # drawn on the CPU: same start on any device
        if self.clip:
            x = spec.clip(x)
        if self.uses_channels_last(spec):
            x = x.contiguous(memory_format=torch.channels_last)
        return PixelCanvas(x, self, spec.bounds() if self.clip else None)

    # -- the loop ---------------------------------------------------------------------------
    def synthesize(self, teacher: Teacher, num_samples: int, *, seed: int = 0, batch_size: int = 32,
                   progress: bool = True, workdir: Path | None = None) -> CalibrationSet:
        self.check_teacher(teacher)
        sizes = batches_of(num_samples, self.synthesis_batch_size)
        targets: dict[int, Targets | None] = {}

        def targets_of(i: int, n: int) -> Targets | None:
            if i not in targets:
                targets[i] = self.batch_targets(teacher, n, seed, i)
            return targets[i]

        world = distributed.current()
        if world.distributed and world.is_main and not self._independent and self.bn_scope == "batch":
            warnings.warn(f"{self.name}'s batches depend on the ones before them: under {world.size} processes the "
                          "ranks take turns, so the set is the same but not made faster", stacklevel=2)
        own = sum(world.owns(i) for i in range(len(sizes)))
        bar = progress_bar(total=own * self.iterations, desc=f"{self.name} {num_samples} images",
                           enabled=progress and world.is_main, unit="it")

        def after(i: int, images: torch.Tensor, resumed: bool) -> None:
            self._after(teacher, images, targets_of(i, len(images)), bar if resumed else None, i)

        try:
            with self.session(teacher, seed):
                if self.bn_scope == "set":
                    self._check_joint()
                    joint = optimize_jointly(self, teacher, sizes, seed, bar, targets_of)
                    parts = resumable_batches(sizes, None, lambda i, n: joint[i], after=after)
                else:
                    parts = resumable_batches(
                        sizes, workdir, lambda i, n: self.optimize_batch(teacher, n, seed, i, bar, targets_of(i, n)),
                        after=after, independent=self._independent)
        finally:
            bar.close()
        images = torch.cat(parts).contiguous()
        kept = [targets[i] for i in range(len(sizes))]
        if any(t is None for t in kept):
            return self.finish(teacher, images, seed, batch_size)
        metadata = {"target_prob": torch.cat([t.target_prob for t in kept]),
                    "asked_hard": torch.cat([t.hard_mask for t in kept]).float()}
        return self.finish(teacher, images, seed, batch_size, labels=torch.cat([t.labels for t in kept]),
                           metadata=metadata)

    def _after(self, teacher: Teacher, images: torch.Tensor, targets: Targets | None, bar: Any,
               index: int = 0) -> None:
        if bar is not None:
            bar.update(self.iterations)  # a batch resumed from the work directory
        world = distributed.current()
        if self._student is not None and world.distributed:
            # the Q-aware student's observers track the images batch after batch: every rank takes the
            # state the batch's owner left, so the next owner starts where one process would
            distributed.broadcast_buffers(self._student, world, src=world.owner(index))
        self.after_batch(teacher, images, targets)

    @property
    def _independent(self) -> bool:
        """Whether batch i can be made without batches < i (the Q-aware student's observers carry state)."""
        return self.batches_independent and not self.qaware_weight

    def _check_joint(self) -> None:
        if type(self).optimize_batch is not OptimizingSynthesizer.optimize_batch:
            raise ValueError(f"{self.name} brings its own per-batch loop, so bn_scope='set' cannot pool its batches; "
                             "use bn_scope='batch' (zeroq, intraq, hast and dynadfq support 'set')")

    def check_teacher(self, teacher: Teacher) -> None:
        if not teacher.bn_layers():
            raise MissingBatchNormError(
                f"{self.name} inverts BatchNorm statistics, but {type(teacher.model).__name__} has no BatchNorm "
                f"layer. Use a source that needs no BN statistics: {LABEL_FREE_SOURCES}."
            )

    def optimize_batch(self, teacher: Teacher, n: int, seed: int, index: int, bar: Any,
                       targets: Targets | None = None) -> torch.Tensor:
        g = seeded_generator(seed, salt=index + 1)
        if targets is None:
            targets = self.batch_targets(teacher, n, seed, index)
        if targets is not None:
            targets = targets.to(teacher.device)
        canvas = self.make_canvas(teacher, n, g)
        bn_modules = [m for _, m in teacher.bn_layers()]
        recorder = BNStatsRecorder(bn_modules, self.statistic, self.bn_per_sample)
        goal = running_targets(bn_modules, self.statistic)
        weights = self.bn_loss.layer_weights(len(goal), teacher.device)
        student_rec = (BNStatsRecorder(batchnorm_modules(self._student), self.statistic, self.bn_per_sample)
                       if self._student is not None else None)
        features: list[torch.Tensor] = []
        best, stale = math.inf, 0
        with contextlib.ExitStack() as stack:
            stack.enter_context(recorder.record())
            if self.wants_features:
                stack.enter_context(teacher.penultimate_features(features))
            if student_rec is not None:
                stack.enter_context(student_rec.record())
            for step in range(self.iterations):
                canvas.zero_grad()
                recorder.clear()
                features.clear()
                view = self.augment(canvas.render(), g)
                logits = teacher(view)
                terms = {"bn": self.bn_weight * self.bn_loss(recorder.stats, goal, weights)}
                if self.input_stats_weight:
                    v, m = torch.var_mean(view, dim=(0, 2, 3), unbiased=False)
                    terms["input"] = self.input_stats_weight * (m.pow(2).sum() + (v.sqrt() - 1).pow(2).sum())
                terms.update(self.task_loss(logits, features[0] if features else None, targets))
                if student_rec is not None and step % self.qaware_every == 0:
                    student_rec.clear()
                    self._student(view)
                    terms["q_bn"] = self.qaware_weight * self.bn_loss(student_rec.stats, detached(recorder.stats))
                loss = sum(terms.values())
                loss.backward()
                canvas.step(loss)
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(batch=index, lr=f"{canvas.lr():.3g}",
                                    **{k: f"{float(v.detach()):.4f}" for k, v in terms.items()})
                if self.early_stop_patience:
                    value = float(loss.detach())
                    if value < best - self.early_stop_delta * abs(best if math.isfinite(best) else value):
                        best, stale = value, 0
                    else:
                        stale += 1
                        if stale >= self.early_stop_patience:
                            bar.update(self.iterations - step - 1)
                            break
        with torch.no_grad():
            final = self.augment.finalize(canvas.result())
            return (teacher.spec.clip(final) if self.clip else final).cpu()

    # -- helpers ------------------------------------------------------------------------------
    def uses_channels_last(self, spec) -> bool:
        if self.channels_last is None:
            return spec.shape[-1] * spec.shape[-2] >= 64 * 64
        return self.channels_last

    @contextlib.contextmanager
    def teacher_layout(self, teacher: Teacher):
        """Run the teacher channels-last (mkldnn's fast path for depthwise convs) and at its precision,
        then restore both; `dfq speed` times the floor inside this too."""
        with teacher.precision(self.teacher_precision):
            if not self.uses_channels_last(teacher.spec):
                yield
                return
            teacher.model.to(memory_format=torch.channels_last)
            try:
                yield
            finally:
                teacher.model.to(memory_format=torch.contiguous_format)

    @contextlib.contextmanager
    def session(self, teacher: Teacher, seed: int):
        self.prepare(teacher, seed)
        with self.teacher_layout(teacher), self.student(teacher):
            yield

    @contextlib.contextmanager
    def student(self, teacher: Teacher):
        """The quantized student of the Q-aware BN term, built by a toolchain plugin, for one run."""
        if not self.qaware_weight:
            yield
            return
        from .qaware import quantized_student

        self._student = quantized_student(teacher, self.qaware_toolchain, self.qaware_scheme)
        try:
            yield
        finally:
            self._student = None

    def _init_images(self, n: int, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
        x = torch.randn((n, *shape), generator=g)
        if self.init == "diverse":  # random per-image channel means/stds, then a box blur
            c = shape[0]
            x = x * torch.rand((n, c, 1, 1), generator=g) + (torch.rand((n, c, 1, 1), generator=g) * 2 - 1)
            x = F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
        return x


__all__ = ["OptimizingSynthesizer"]
