"""What a synthesis step optimises (a canvas) and its optimiser and schedule: the pieces the per-batch
loop (``optimizing``) and the whole-set loop (``whole_set``) share, so neither imports the other's
module for them. A canvas renders images, takes a step on a loss, and reports its learning rate."""
from __future__ import annotations

from typing import Any, Protocol

import torch


class CanvasSettings(Protocol):
    """The synthesizer knobs a canvas's optimiser and schedule read."""

    optimizer: str
    lr: float
    scheduler: str
    iterations: int
    plateau_patience: int
    min_lr: float


class Canvas(Protocol):
    """What is optimised: pixels (``PixelCanvas``) or a generator and its codes (Genie)."""

    def render(self) -> torch.Tensor: ...
    def zero_grad(self) -> None: ...
    def step(self, loss: torch.Tensor) -> None: ...
    def lr(self) -> float: ...
    def result(self) -> torch.Tensor: ...


def make_optimizer(kind: str, params: list, lr: float) -> torch.optim.Optimizer:
    return (torch.optim.Adam if kind == "adam" else torch.optim.RAdam)(params, lr=lr)


def make_scheduler(kind: str, opt: torch.optim.Optimizer, iterations: int, patience: int, min_lr: float):
    if kind == "reduce_on_plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=patience, min_lr=min_lr)
    if kind == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, iterations // 3), gamma=0.5)
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iterations)
    return None


def step_scheduler(sched: Any, loss: torch.Tensor) -> None:
    if sched is None:
        return
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        sched.step(loss.detach())
    else:
        sched.step()


class PixelCanvas:
    """The images themselves are the parameters (clamped to valid pixels after every step)."""

    def __init__(self, x: torch.Tensor, synth: CanvasSettings, bounds: tuple | None) -> None:
        self.x = x.requires_grad_(True)
        self.opt = make_optimizer(synth.optimizer, [self.x], synth.lr)
        self.sched = make_scheduler(synth.scheduler, self.opt, synth.iterations, synth.plateau_patience,
                                    synth.min_lr)
        self.bounds = None if bounds is None else tuple(b.to(x.device) for b in bounds)

    def render(self) -> torch.Tensor:
        return self.x

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self, loss: torch.Tensor) -> None:
        self.opt.step()
        if self.bounds is not None:
            with torch.no_grad():
                self.x.clamp_(*self.bounds)
        step_scheduler(self.sched, loss)

    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def result(self) -> torch.Tensor:
        return self.x.detach()
