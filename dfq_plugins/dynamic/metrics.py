"""How good a router's choices are: against an oracle, per bit-width, and on which data."""
from __future__ import annotations

from typing import Any

import torch


def oracle_choices(variant_logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The cheapest variant whose prediction agrees with ``reference`` (the FP prediction); the
    dearest one when none does. ``variant_logits`` is (variants, N, classes), cheapest first."""
    agree = variant_logits.argmax(-1) == reference[None]  # (K, N)
    agree[-1] = True
    return agree.float().argmax(0)  # first True


def choice_fractions(choices: torch.Tensor, num_choices: int) -> list[float]:
    counts = torch.bincount(choices, minlength=num_choices).float()
    return (counts / max(1, choices.numel())).tolist()


def precision_recall(choices: torch.Tensor, oracle: torch.Tensor, num_choices: int) -> dict[str, Any]:
    """Per choice: precision P(oracle = k | chosen k), recall P(chosen k | oracle = k), support;
    overall: the exact-match rate and the rate of choices with at least the oracle's bits."""
    precision: list[float | None] = []
    recall: list[float | None] = []
    support = []
    for k in range(num_choices):
        chosen, needed = choices == k, oracle == k
        hits = int((chosen & needed).sum())
        precision.append(hits / int(chosen.sum()) if chosen.any() else None)
        recall.append(hits / int(needed.sum()) if needed.any() else None)
        support.append(int(needed.sum()))
    return {"precision": precision, "recall": recall, "oracle_support": support,
            "exact": float((choices == oracle).float().mean()),
            "enough_bits": float((choices >= oracle).float().mean())}
