"""``adadfq``: AdaDFQ (Qian et al., CVPR 2023), the generator and the quantized net in a zero-sum game.

Generator loss on x = G(z, y), with d = z_P - z_Q and a = z_P + z_Q (Q in the graph, only G
steps): ``L_m + beta (alpha_ds CE(d, y) + alpha_as CE(a, y)) + gamma L_BNS``, where L_m keeps
the normalised disagreement entropy h~ of softmax(d) inside [lambda_l, lambda_u]:
``mean relu(lambda_l - h~) + mean relu(h~ - lambda_u)``; h~ = (h - min h) / (log C - min h)
over the batch (the released code; ``batch_min_normalisation=False`` uses h / log C).
Student loss on the detached x: ``-T^2 mean H(softmax((z_P - z_Q) / T))``, no CE or KD term,
as in the released code. No student updates during ``warmup_steps``. The release re-observes the
activation ranges on the generator's images and freezes them after 4 of 400 epochs; here the
calibrated ranges are kept and the observers keep following the generator (``ranges="observe"``),
``recalibrate=True, observer_steps=N`` re-observes them as the release does.

Differences from the release: any batch size (its margin loss hard-codes 16); the student is
whatever the toolchain builds (not the papers' Protocol-A quantizer); steps, LR and schedule
follow this package's CPU budget unless a recipe sets the published 400 x 200 schedule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..config import NON_NEGATIVE, UNIT, Bound
from ..losses import entropy
from .kd import KDDistiller, OnlineDistiller
from .loop import LossValue, TrainingRun


@dataclass
class AdaDFQDistiller(OnlineDistiller):
    name: ClassVar[str] = "adadfq"

    temperature: float = 20.0  # T of the student loss (CIFAR 20, ImageNet 5)
    alpha_ds: float = 0.2
    alpha_as: float = 0.1
    lambda_l: float = 0.1
    lambda_u: float = 0.8
    beta: float = 1.0
    gamma: float = 1.0
    extra_bounds: ClassVar[dict[str, Bound]] = {
        **KDDistiller.extra_bounds, "alpha_ds": NON_NEGATIVE, "alpha_as": NON_NEGATIVE, "lambda_l": UNIT,
        "lambda_u": UNIT, "beta": NON_NEGATIVE, "gamma": NON_NEGATIVE}
    batch_min_normalisation: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.lambda_l <= self.lambda_u <= 1:
            raise ValueError(f"need 0 <= lambda_l <= lambda_u <= 1, got {self.lambda_l}, {self.lambda_u}")

    def margin_loss(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = entropy(d)
        log_c = math.log(d.shape[1])
        if self.batch_min_normalisation:
            low = h.min().detach()
            h_n = (h - low) / (log_c - low).clamp_min(1e-6)
        else:
            h_n = h / log_c
        loss = F.relu(self.lambda_l - h_n).mean() + F.relu(h_n - self.lambda_u).mean()
        return loss, h_n

    def train_step(self, run: TrainingRun, step: int) -> dict[str, LossValue]:
        x, y = self.generator_images(run, step)
        with self._recorder.record():
            z_p = run.teacher(x)
        z_q = run.student(x)
        d, a = z_p - z_q, z_p + z_q
        l_m, h_n = self.margin_loss(d)
        l_ds, l_as = F.cross_entropy(d, y), F.cross_entropy(a, y)
        l_bns = self._bns(self._recorder.stats, self._targets)
        run.update("generator", l_m + self.beta * (self.alpha_ds * l_ds + self.alpha_as * l_as) + self.gamma * l_bns)

        losses: dict[str, LossValue] = {"g_margin": l_m.detach(), "g_ds": l_ds.detach(), "g_as": l_as.detach(),
                                        "g_bns": l_bns.detach(), "h_norm": h_n.detach().mean()}
        if run.updating_student:
            t = self.temperature
            z_q = run.student(x.detach())
            l_q = -(t * t) * entropy((z_p.detach() - z_q) / t).mean()
            run.update_student(l_q)
            losses["q"] = l_q.detach()
        return losses
