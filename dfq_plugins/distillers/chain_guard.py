"""The guard between the stages of a distiller chain (``reconstruct+kd``, ``reconstruct+adadfq``).

A later stage starts from a student that is already good, and a loop can wreck it: measured on
ResNet-20 (docs/claims.md), ``reconstruct+adadfq`` and ``reconstruct+causal`` at W4A4 lost 5.7 and
9.9 points, and ``reconstruct+kd`` at W2A4 fell from 75.75 to 36.27. So a stage after the first is
kept only if the student's top-1 agreement with the FP model on the calibration images does not
fall by more than ``tolerance``; otherwise the student of the stage before is returned, with a
warning. The stage trained on those images, so the check is lenient: it catches collapses, not
small losses.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..device import module_device

TOLERANCE = 0.02  # agreement may fall by up to 2 points of the calibration images before a rollback


@dataclass
class GuardOutcome:
    stage: str
    agreement_before: float
    agreement_after: float
    rolled_back: bool

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "agreement_before": round(self.agreement_before, 4),
                "agreement_after": round(self.agreement_after, 4), "rolled_back": self.rolled_back}


class ChainGuard:
    """Measures a chain's student against the FP model on the calibration images. The FP
    model's predictions are computed once per chain, and a stage's result is the next stage's
    starting point, so each stage costs one student pass over the images."""

    def __init__(self, model: nn.Module, toolchain: Any, images: torch.Tensor, chunk: int = 256) -> None:
        self.model, self.toolchain, self.images, self.chunk = model, toolchain, images, chunk
        self._teacher: torch.Tensor | None = None
        self._current: float | None = None  # agreement of the student the next stage starts from

    @torch.no_grad()
    def _top1(self, net: nn.Module) -> torch.Tensor:
        dev = module_device(self.model)
        return torch.cat([net(self.images[i:i + self.chunk].to(dev)).argmax(1).cpu()
                          for i in range(0, self.images.shape[0], self.chunk)])

    def agreement(self, student: nn.Module) -> float:
        """Share of the images on which the student's top-1 is the FP model's (observers off)."""
        if self._teacher is None:
            was_training = self.model.training
            self.model.eval()
            try:
                self._teacher = self._top1(self.model)
            finally:
                self.model.train(was_training)
        with self.toolchain.measuring(student):
            same = (self._top1(student) == self._teacher).sum()
        return int(same) / max(1, self.images.shape[0])

    def before(self, student: nn.Module) -> nn.Module | None:
        """The copy to roll back to (None: this student cannot be copied, the stage runs unguarded)."""
        keep = snapshot(student)
        if keep is None:
            self._current = None  # the unguarded stage changes the student: measure it afresh next time
        elif self._current is None:
            self._current = self.agreement(keep)
        return keep

    def after(self, stage: str, student: nn.Module, keep: nn.Module) -> tuple[nn.Module, GuardOutcome]:
        """The student to go on with: this stage's, or ``keep`` when the stage collapsed it."""
        outcome = judge(stage, float(self._current), self.agreement(student))
        if outcome.rolled_back:
            return keep, outcome
        self._current = outcome.agreement_after
        return student, outcome


def snapshot(student: nn.Module) -> nn.Module | None:
    """A copy to roll back to; None (and a warning) when this student cannot be copied."""
    try:
        return copy.deepcopy(student)
    except Exception as exc:  # a toolchain's model that refuses deepcopy: run unguarded, say so
        warnings.warn(f"chain guard off for this stage: the student could not be copied ({exc})", stacklevel=4)
        return None


def judge(stage: str, before: float, after: float, tolerance: float = TOLERANCE) -> GuardOutcome:
    """Whether a stage's result is kept; warns when it is not."""
    rolled_back = after < before - tolerance
    if rolled_back:
        warnings.warn(f"distiller stage {stage!r} lowered the student's agreement with the FP model on the "
                      f"calibration images from {before:.1%} to {after:.1%}; the student of the stage before is "
                      f"returned. Fewer steps or a lower lr may let {stage!r} help; or leave it out of the chain.",
                      stacklevel=4)
    return GuardOutcome(stage, before, after, rolled_back)


__all__ = ["ChainGuard", "GuardOutcome", "TOLERANCE", "judge", "snapshot"]
