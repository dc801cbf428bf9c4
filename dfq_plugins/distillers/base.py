"""What every distiller shares: its config as dataclass fields and the ``distill`` entry point."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    POSITIVE,
    UNIT_OPEN_ABOVE,
    Bound,
    ConfigError,
    check_declared,
)
from ..data import CalibrationSet
from ..teacher import TEACHER_PRECISIONS, Teacher
from .loop import LR_SCHEDULES, RANGE_MODES, LossValue, TrainingRun

OPTIMIZERS = ("sgd", "adam")


@dataclass
class Distiller:
    """Base class: subclasses are dataclasses whose fields are their configuration.

    ``distill(teacher, student, source, toolchain=...)`` fine-tunes ``student`` (a toolchain's
    trainable, calibrated fake-quant model) in place and returns it. ``source`` is the offline
    calibration set a distiller trains on, or, for one that brings its own generator, the set
    the student was calibrated on (unused by the loop).

    Defaults are a CPU budget for CIFAR-sized models; the published schedules are recipes.
    """

    name: ClassVar[str] = "distiller"
    version: ClassVar[int] = 1

    steps: int = 1000
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: str = "cosine"
    lr_milestones: tuple[float, ...] = (0.5, 0.75)
    lr_gamma: float = 0.1
    warmup_steps: int = 0  # no student updates before this step (ranges may still move)
    observer_steps: int = 0  # activation observers stay on for these first steps
    ranges: str = "frozen"  # after observer_steps: frozen | observe | learned (LSQ scales on every toolchain)
    range_lr_scale: float = 1.0  # learned ranges train at lr * this
    # absolute: one Adam/SGD LR for every scale; relative: each scale's LR times its own mean size, so an
    # 8-bit weight scale of 1e-3 and an activation scale of 0.5 move by the same fraction per step
    range_lr_mode: str = "absolute"
    # a student that arrives with learned ranges (reconstruct's, in reconstruct+kd): keep them frozen, with no
    # observer, or retrain them under this loop's ranges/observer_steps (observers would overwrite them)
    inherited_ranges: str = "keep"
    time_budget_s: float = 0.0  # stop early after this much wall time (0: steps only)
    checkpoint_every: int = 200
    bn_mode: str = "running"  # running: BN on its running statistics (GDFQ family); batch: BN in train mode
    teacher_precision: str = "fp32"  # "bf16": the frozen teacher's forward under bfloat16 autocast (for GPUs)

    # fewer student steps (after the warm-up) than this draw a warning: see OnlineDistiller
    short_budget_steps: ClassVar[int] = 0
    speed_only_fields: ClassVar[tuple[str, ...]] = ("checkpoint_every",)
    # options added after runs were cached and recorded, with the default that does what runs did before:
    # at that default they stay out of config_dict, so caches and `dfq bench --json` resumes stay valid
    later_options: ClassVar[dict[str, Any]] = {"teacher_precision": "fp32"}
    # valid ranges and choices of the options, checked when the distiller is built (before any work);
    # subclasses add theirs with ``extra_bounds``/``extra_choices``
    bounds: ClassVar[dict[str, Bound]] = {
        "steps": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE, "lr": POSITIVE, "momentum": UNIT_OPEN_ABOVE,
        "weight_decay": NON_NEGATIVE, "lr_gamma": POSITIVE, "warmup_steps": NON_NEGATIVE,
        "observer_steps": NON_NEGATIVE, "range_lr_scale": POSITIVE, "time_budget_s": NON_NEGATIVE,
        "checkpoint_every": NON_NEGATIVE}  # 0: no checkpoints
    choices: ClassVar[dict[str, tuple]] = {"optimizer": OPTIMIZERS, "ranges": tuple(RANGE_MODES),
                                           "lr_schedule": tuple(LR_SCHEDULES), "bn_mode": ("running", "batch"),
                                           "range_lr_mode": ("absolute", "relative"),
                                           "inherited_ranges": ("keep", "retrain"),
                                           "teacher_precision": TEACHER_PRECISIONS}
    extra_bounds: ClassVar[dict[str, Bound]] = {}
    extra_choices: ClassVar[dict[str, tuple]] = {}

    def __post_init__(self) -> None:
        check_declared(self, {**Distiller.bounds, **self.extra_bounds}, {**Distiller.choices, **self.extra_choices},
                       self.name)
        if any(not 0 < m < 1 for m in self.lr_milestones):
            raise ConfigError(f"{self.name}.lr_milestones = {list(self.lr_milestones)}: fractions of the run, "
                              "each in (0, 1)")
        if self.steps < 1:
            raise ValueError("steps must be at least 1")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.warmup_steps >= self.steps:
            if self.short_budget_steps:  # its generator needs the warm-up: shortening it is the wrong advice
                fix = (f"give at least --steps {self.warmup_steps + self.short_budget_steps} (the warm-up trains the "
                       "generator the student then learns from)")
            else:
                fix = (f"give more steps, or a shorter warm-up, e.g. --distill-set "
                       f"{self.name}.warmup_steps={self.steps // 5}")
            raise ValueError(f"{self.name}: {self.steps} steps with a {self.warmup_steps}-step warm-up would never "
                             f"update the student (it trains only after the warm-up); {fix}")
        if self.steps - self.warmup_steps < self.short_budget_steps:
            warnings.warn(
                f"{self.name}: only {self.steps - self.warmup_steps} student steps after the {self.warmup_steps}-step "
                f"warm-up. A loop with its own generator first moves the student away from its calibrated start and "
                f"recovers later (ResNet-20 W4A4 PT2E, default options: 24 student steps took 79.83% to 20.49%, 100 to "
                f"84.12%, 400 to 86.80%; docs/distillation.md). Give at least --steps "
                f"{self.warmup_steps + self.short_budget_steps}, or quantize without the loop for a quick check",
                stacklevel=3)
        if self.bn_mode not in ("running", "batch"):
            raise ValueError(f"bn_mode={self.bn_mode!r}; choose 'running' (BN statistics frozen, as the GDFQ "
                             "family fine-tunes) or 'batch' (BN re-estimated on the synthetic batches)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r}; choose one of {LR_SCHEDULES}")
        self.lr_milestones = tuple(float(m) for m in self.lr_milestones)

    def config_dict(self) -> dict[str, Any]:
        later: dict[str, Any] = {}  # every class's later options, so a subclass adding its own keeps the base's
        for cls in reversed(type(self).__mro__):
            later.update(vars(cls).get("later_options", {}))
        out = {}
        for f in fields(self):
            if f.name.startswith("_") or f.name in self.speed_only_fields:
                continue
            v = getattr(self, f.name)
            if f.name in later and v == later[f.name]:
                continue
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    # -- the contract ----------------------------------------------------------------------------
    def requires_source(self) -> bool:
        """False for a distiller that generates its own training data."""
        return True

    def setup(self, run: TrainingRun) -> None:
        """Build generators and their optimisers (``run.add_generator``); check the source."""

    def train_step(self, run: TrainingRun, step: int) -> dict[str, LossValue]:
        """One step; returns the losses to show: detached 0-dim tensors (read on the host only every
        few steps, so a GPU never waits for them) or floats."""
        raise NotImplementedError

    def distill(self, teacher: Teacher, student: nn.Module, source: CalibrationSet | None, *, toolchain: Any,
                seed: int = 0, progress: bool = True, workdir: Path | None = None, key: str = "") -> nn.Module:
        if self.requires_source() and source is None:
            raise ValueError(f"distiller {self.name!r} trains on a calibration set; pass source=CalibrationSet "
                             "(e.g. dfq_plugins.synthesize(model, 'intraq'))")
        if self.bn_mode == "batch":
            toolchain.student_train(student)
        else:
            toolchain.student_eval(student)
        run = TrainingRun(self, teacher, student, toolchain, source, seed, workdir, key or self.name, progress)
        run.add_student()
        with torch.random.fork_rng():  # generator initialisation, without touching the caller's RNG
            torch.manual_seed(seed)  # (everything per step draws from run.rng(step))
            self.setup(run)
        with teacher.precision(self.teacher_precision):
            run.resume()
            run.run(self.train_step)
        toolchain.student_eval(student)
        self.last_run = run
        return student


__all__ = ["Distiller"]
