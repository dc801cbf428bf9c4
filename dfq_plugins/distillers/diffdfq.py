"""``diffdfq``: DiffDFQ's calibration over stored diffusion levels with progressive selection.

The source is a set with diffusion levels (synthesizer ``diffdfq``). Training runs in epochs of
``epoch_steps`` steps, each on one level's images. At the first epoch every level is scored by
D(T) = sum over batches of ||z_P(x_T) - z_Q(x_T)||_F (no gradient) and the start level is
argmin D. At each later epoch the window {level - 1, level} (``window`` levels) is scored again
and the level moves to the window's argmin, so it only ever decreases toward clean samples.
Student loss: KD + CE, as ``kd`` (the released code: batchmean KL x 20 x T^2, T = 20, + CE).

Differences from the release: the student arrives calibrated by its toolchain on the clean set,
so the released GDFQ generator warm-up that only calibrates ranges is not repeated; epochs
are ``epoch_steps`` long (the release: 200) to fit a CPU budget.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import AT_LEAST_ONE, Bound
from ..diffusion import DiffusionLevels
from .batches import sample_batch
from .kd import KDDistiller
from .loop import LossValue, TrainingRun


@dataclass
class DiffDFQDistiller(KDDistiller):
    name: ClassVar[str] = "diffdfq"

    epoch_steps: int = 50
    window: int = 2
    score_chunk: int = 256
    extra_bounds: ClassVar[dict[str, Bound]] = {
        **KDDistiller.extra_bounds, "epoch_steps": AT_LEAST_ONE, "window": AT_LEAST_ONE, "score_chunk": AT_LEAST_ONE}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.online:
            raise ValueError("diffdfq trains on the stored diffusion levels of an offline set (online=False)")
        if self.epoch_steps < 1 or self.window < 2:
            raise ValueError("need epoch_steps >= 1 and window >= 2")

    def setup(self, run: TrainingRun) -> None:
        self._levels = DiffusionLevels.of(run.source)
        self._labels = run.source.labels
        self._teacher_logits: dict[int, torch.Tensor] = {}
        self._images: dict[int, torch.Tensor] = {}

    def level_images(self, level: int) -> torch.Tensor:
        if level not in self._images:
            self._images = {level: self._levels.images(level)}  # keep one level in memory
        return self._images[level]

    @torch.no_grad()
    def discrepancy(self, run: TrainingRun, level: int) -> float:
        x = self.level_images(level)
        chunks = [x[i:i + self.score_chunk] for i in range(0, x.shape[0], self.score_chunk)]
        if level not in self._teacher_logits:
            self._teacher_logits[level] = [run.teacher(c.to(run.device)) for c in chunks]
        total = 0.0
        with run.observers_paused():
            for z_p, c in zip(self._teacher_logits[level], chunks):
                total += float(torch.linalg.matrix_norm(z_p - run.student(c.to(run.device))))
        return total

    def select_level(self, run: TrainingRun) -> int:
        current = run.extra.get("level")
        if current is None:
            candidates = list(range(len(self._levels)))
        else:
            candidates = list(range(max(0, current - self.window + 1), current + 1))
        scores = {t: self.discrepancy(run, t) for t in candidates}
        scored = {t: s for t, s in scores.items() if s > 0} or scores
        best = min(scored, key=lambda t: (scored[t], -t))
        if current is not None:
            best = min(best, current)  # only ever toward clean samples
        run.extra["level"] = best
        run.extra.setdefault("levels", []).append(best)
        return best

    def train_step(self, run: TrainingRun, step: int) -> dict[str, LossValue]:
        if step % self.epoch_steps == 0 or "level" not in run.extra:
            self.select_level(run)
        level = run.extra["level"]
        x, (y,) = sample_batch(self.level_images(level), self.batch_size, run.rng(step), self.augment,
                               (self._labels,), device=run.device)
        x, y = run.share(x), None if y is None else run.share(y)
        z_p = run.teacher_logits(x)
        loss, parts = self.student_loss(run.student(x), z_p, y)
        run.update_student(loss)
        return {**parts, "level": float(level)}
