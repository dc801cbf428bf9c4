"""``causal``: Causal-DFQ (Shang et al., ICCV 2023), reconstructed; no code was ever published.

Established by the abstract: a content/style-decoupled generator, and a discrepancy-reduction
loss that aligns the teacher's and the quantized student's predictive distributions under
interventions on style. Everything else here is an assumption (``methods.md`` section 3.2),
each one a parameter:

- generator: GDFQ's, its input [class embedding (content), style code s ~ N(0, I)]
  (``style_dim``), trained on CE(P(x), y) + ``bns_weight`` x BN-statistics loss;
- intervention do(S = s_k): ``interventions`` (K) style codes per content in the latent space,
  or K random shifts/flips of one image (``intervention_space="pixel"``);
- student loss: KD + CE (as ``kd``) + ``dr_weight`` x L_DR, with L_DR =
  D(mean_k p_P(.|x_ck) || mean_k p_Q(.|x_ck)) (the intervened distributions aligned) +
  ``invariance_weight`` x mean_k D(p_Q(.|x_ck) || p_Q(.|x_c,k+1)) (the student invariant to
  style), D = KL or JS (``divergence``), at the KD temperature and scaled like the KD term,
  so ``dr_weight`` is relative to it (0.1 after the "drops beyond ~10%" remark);
- ``style_diversity`` (latent interventions): a mode-seeking term on the generator (MSGAN's ratio,
  mean |s_k - s_k'| / mean |x_k - x_k'| between neighbouring interventions of one content), the
  "style-diversity term" methods.md 3.3 lists as optional. Without it the generator learns to
  ignore the style code: at step 400 of ResNet-20 W4A4 the images of one class were 3x closer to
  each other than to other classes (GDFQ's: level), the teacher 99.96% sure of every one, and the
  interventions the discrepancy loss compares were near copies (docs/claims.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..config import AT_LEAST_ONE, NON_NEGATIVE, Bound
from ..losses import kd_loss
from .batches import apply_shift_flip, shift_flip_draws
from .kd import KDDistiller, OnlineDistiller
from .loop import LossValue, TrainingRun

INTERVENTION_SPACES = ("latent", "pixel")
DIVERGENCES = ("kl", "js")


def divergence(p: torch.Tensor, q: torch.Tensor, kind: str) -> torch.Tensor:
    """Batch-mean D(p || q) between probability rows."""
    eps = 1e-8
    if kind == "kl":
        return (p * ((p + eps).log() - (q + eps).log())).sum(1).mean()
    m = 0.5 * (p + q)
    return 0.5 * (divergence(p, m, "kl") + divergence(q, m, "kl"))


@dataclass
class CausalDFQDistiller(OnlineDistiller):
    name: ClassVar[str] = "causal"

    reconstructed: bool = True  # a marker in every record: this method is a reconstruction
    interventions: int = 4
    style_dim: int = 64
    intervention_space: str = "latent"
    dr_weight: float = 0.1
    invariance_weight: float = 1.0
    divergence: str = "kl"
    style_diversity: float = 0.0  # weight of the mode-seeking term on the generator (latent interventions)
    later_options: ClassVar[dict[str, Any]] = {"style_diversity": 0.0}
    extra_bounds: ClassVar[dict[str, Bound]] = {
        **KDDistiller.extra_bounds, "interventions": AT_LEAST_ONE, "style_dim": AT_LEAST_ONE,
        "dr_weight": NON_NEGATIVE, "invariance_weight": NON_NEGATIVE, "style_diversity": NON_NEGATIVE}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.intervention_space not in INTERVENTION_SPACES:
            raise ValueError(f"intervention_space={self.intervention_space!r}; choose one of {INTERVENTION_SPACES}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence={self.divergence!r}; choose one of {DIVERGENCES}")
        if self.style_diversity > 0 and self.intervention_space != "latent":
            raise ValueError("style_diversity spreads the images of one content over its style codes, which only "
                             "latent interventions have; use intervention_space='latent' or style_diversity=0")
        if self.interventions < 2 or self.batch_size < self.interventions:
            raise ValueError("need interventions >= 2 and batch_size >= interventions (contents x interventions)")

    def generator_style_dim(self) -> int:
        return self.style_dim

    def intervened_images(self, run: TrainingRun, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(contents x K) images, grouped by content: rows c*K .. c*K+K-1 share class y_c. In latent
        space the style codes of the last call stay in ``self._styles`` for the diversity term."""
        g = run.rng(step, salt=1)
        k = self.interventions
        contents = self.batch_size // k
        gen = run.trainables["generator"].module.train()
        y = torch.randint(0, run.teacher.spec.num_classes, (contents,), generator=g).repeat_interleave(k)
        if self.intervention_space == "latent":
            z = torch.randn(contents * k, self.style_dim, generator=g)
            y, z = run.share(y.view(contents, k)).flatten(), run.share(z.view(contents, k, -1)).flatten(0, 1)
            self._styles = z.to(run.device)
            return gen(self._styles, y.to(run.device)), y.to(run.device)
        z = torch.randn(contents, self.style_dim, generator=g)
        shifts = shift_flip_draws(contents * k, g)  # drawn for the whole batch, so every rank draws the same
        y_c, z = run.share(y[::k]), run.share(z)  # this rank's contents (whole groups of K interventions)
        base = gen(z.to(run.device), y_c.to(run.device))
        rows = run.share(torch.arange(contents * k).view(contents, k)).flatten()
        return apply_shift_flip(base.repeat_interleave(k, 0), shifts, rows), y_c.repeat_interleave(k).to(run.device)

    def diversity_loss(self, x: torch.Tensor, styles: torch.Tensor) -> torch.Tensor:
        """MSGAN's mode-seeking ratio within each content's K interventions: falls as images of one
        content grow apart relative to their style codes. ``x`` still carries the generator's graph."""
        k = self.interventions
        xs = x.view(-1, k, *x.shape[1:])
        ss = styles.view(-1, k, styles.shape[1])
        image_gap = (xs - xs.roll(1, dims=1)).abs().flatten(2).mean(2)
        style_gap = (ss - ss.roll(1, dims=1)).abs().mean(2)
        return (style_gap / (image_gap + 1e-5)).mean()

    def discrepancy_loss(self, z_p: torch.Tensor, z_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t, k = self.temperature, self.interventions
        p = torch.softmax(z_p.detach() / t, 1).view(-1, k, z_p.shape[1])
        q = torch.softmax(z_q / t, 1).view(-1, k, z_q.shape[1])
        scale = self.kd_weight * t * t
        align = divergence(p.mean(1), q.mean(1), self.divergence) * scale
        inv = divergence(q.flatten(0, 1), q.roll(1, dims=1).flatten(0, 1), self.divergence) * scale
        return align, inv

    def train_step(self, run: TrainingRun, step: int) -> dict[str, LossValue]:
        losses: dict[str, LossValue] = {}
        x, y = self.intervened_images(run, step)
        extra = None
        if self.style_diversity > 0:  # latent interventions only (__post_init__ refuses pixel ones)
            div = self.diversity_loss(x, self._styles)
            extra = self.style_diversity * div
            losses["g_div"] = div.detach()
        x, z_p = self.gdfq_generator_step(run, x, y, losses, extra)
        z_q = run.student(x)
        loss, parts = self.student_loss(z_q, z_p, y)
        align, inv = self.discrepancy_loss(z_p, z_q)
        run.update_student(loss + self.dr_weight * (align + self.invariance_weight * inv))
        return {**losses, **parts, "dr_align": align.detach(), "dr_inv": inv.detach()}


__all__ = ["CausalDFQDistiller", "divergence", "kd_loss"]
