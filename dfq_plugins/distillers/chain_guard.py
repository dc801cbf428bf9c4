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


@torch.no_grad()
def agreement(model: nn.Module, student: nn.Module, toolchain: Any, images: torch.Tensor, chunk: int = 256) -> float:
    """Share of ``images`` on which the student's top-1 is the FP model's (observers off)."""
    dev = module_device(model)
    was_training = model.training
    model.eval()
    same = 0
    try:
        with toolchain.measuring(student):
            for i in range(0, images.shape[0], chunk):
                x = images[i:i + chunk].to(dev)
                same += int((model(x).argmax(1) == student(x).argmax(1)).sum())
    finally:
        model.train(was_training)
    return same / max(1, images.shape[0])


def snapshot(student: nn.Module) -> nn.Module | None:
    """A copy to roll back to; None (and a warning) when this student cannot be copied."""
    try:
        return copy.deepcopy(student)
    except Exception as exc:  # a toolchain's model that refuses deepcopy: run unguarded, say so
        warnings.warn(f"chain guard off for this stage: the student could not be copied ({exc})", stacklevel=3)
        return None


def judge(stage: str, before: float, after: float, tolerance: float = TOLERANCE) -> GuardOutcome:
    """Whether a stage's result is kept; warns when it is not."""
    rolled_back = after < before - tolerance
    if rolled_back:
        warnings.warn(f"distiller stage {stage!r} lowered the student's agreement with the FP model on the "
                      f"calibration images from {before:.1%} to {after:.1%}; the student of the stage before is "
                      f"returned. Fewer steps or a lower lr may let {stage!r} help; or leave it out of the chain.",
                      stacklevel=3)
    return GuardOutcome(stage, before, after, rolled_back)


__all__ = ["GuardOutcome", "TOLERANCE", "agreement", "judge", "snapshot"]
