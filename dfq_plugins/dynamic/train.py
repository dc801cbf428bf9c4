"""Training the bit selector on synthetic images against fixed, already fine-tuned variants.

The variants' outputs on the (augmented) synthetic images are computed once, so training the
selector costs seconds. Forward: each input's hard (arg-max) choice, its loss and its
bit-FLOPs. Backward: a differentiable surrogate through the selector's softmax, either the
expected loss and cost over the choices (``surrogate="expected"``) or CADyQ's straight-through
mixing of the variants' outputs (``"straight-through"``). A hinge holds the batch's average
bit-FLOPs to the target.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..distillers.batches import shift_flip
from ..progress import progress_bar

SURROGATES = ("expected", "straight-through")


@dataclass
class SelectorConfig:
    """How the selector trains; the defaults fit ResNet-20 on 256 to 2,000 synthetic images."""

    steps: int = 500
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    penalty: float = 20.0  # weight of the hinge on (average bit-FLOPs - target) / dearest variant's
    surrogate: str = "expected"
    temperature: float = 1.0  # of the teacher-student KL that scores each variant on each input

    def __post_init__(self) -> None:
        if self.surrogate not in SURROGATES:
            raise ValueError(f"surrogate={self.surrogate!r}: choose one of {SURROGATES}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SelectorConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown selector options {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


@torch.no_grad()
def augmented_copies(images: torch.Tensor, copies: int, seed: int) -> torch.Tensor:
    """The images plus ``copies - 1`` shifted/flipped copies: more views for a small set."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([images] + [shift_flip(images, g) for _ in range(copies - 1)])


@torch.no_grad()
def batched(fn: Any, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def per_choice_kl(variant_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || variant) per variant and input: (variants, N)."""
    t = torch.log_softmax(teacher_logits / temperature, -1)
    v = torch.log_softmax(variant_logits / temperature, -1)
    return (t.exp() * (t - v)).sum(-1)


def train_selector(selector: nn.Module, images: torch.Tensor, variant_logits: torch.Tensor,
                   teacher_logits: torch.Tensor, costs: torch.Tensor, target: float,
                   config: SelectorConfig | None = None, *, seed: int = 0,
                   progress: bool = True) -> list[dict[str, float]]:
    """Fit ``selector`` so that its choices keep the KL to the teacher low at ``target`` average
    bit-FLOPs (of the variants; the selector's own cost is constant). Returns a short history."""
    cfg = config or SelectorConfig()
    n = images.shape[0]
    if variant_logits.shape[:2] != (costs.numel(), n) or teacher_logits.shape[0] != n:
        raise ValueError(f"variant_logits {tuple(variant_logits.shape)} must be (variants={costs.numel()}, "
                         f"N={n}, classes) and teacher_logits (N, classes)")
    scale = float(costs.max())
    rel_costs, rel_target = (costs / scale).float(), float(target) / scale
    kl = per_choice_kl(variant_logits.float(), teacher_logits.float(), cfg.temperature)  # (K, N)
    g = torch.Generator().manual_seed(seed)
    params = [p for p in selector.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    selector.train()
    history = []
    bar = progress_bar(cfg.steps, f"selector, target {rel_target:.2f}", enabled=progress)
    for step in range(cfg.steps):
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=g)
        probs = torch.softmax(selector(images[idx]), 1)  # (B, K)
        hard = F.one_hot(probs.argmax(1), probs.shape[1]).to(probs.dtype)
        st = hard + probs - probs.detach()  # hard forward, softmax backward
        if cfg.surrogate == "expected":
            task = (st * kl[:, idx].T).sum(1).mean()
        else:
            mixed = torch.einsum("bk,kbc->bc", st, variant_logits[:, idx].float())
            task = per_choice_kl(mixed[None], teacher_logits[idx].float(), cfg.temperature).mean()
        avg_cost = (st * rel_costs).sum(1).mean()
        loss = task + cfg.penalty * F.relu(avg_cost - rel_target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update(1)
        if step % 50 == 0 or step == cfg.steps - 1:
            row = {"step": step, "task": task.item(), "avg_cost": avg_cost.item() * scale,
                   "fractions": hard.mean(0).tolist()}
            history.append(row)
            bar.set_postfix(task=f"{row['task']:.4f}", cost=f"{avg_cost.item():.3f}")
    bar.close()
    selector.eval()
    return history
