"""DynamicQuantModel: quantized variants of one model at several bit-widths, and a router that
sends each input to one of them."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..losses import entropy


@dataclass
class Routing:
    """What one routed batch did: the outputs, each input's variant index and its bit-FLOPs."""

    logits: torch.Tensor
    choices: torch.Tensor
    cost: torch.Tensor


def run_grouped(x: torch.Tensor, choices: torch.Tensor, variants: Sequence[nn.Module]) -> torch.Tensor:
    """Group the batch by choice, run each group through its variant once, restore the order."""
    out: torch.Tensor | None = None
    for k in torch.unique(choices).tolist():
        idx = (choices == k).nonzero(as_tuple=True)[0]
        y = variants[k](x[idx])
        if out is None:
            out = y.new_empty((x.shape[0], *y.shape[1:]))
        out[idx] = y
    assert out is not None
    return out


class SelectorRouter(nn.Module):
    """A learned bit selector: one forward of the selector, the arg-max variant for each input."""

    def __init__(self, selector: nn.Module, cost: float = 0.0) -> None:
        super().__init__()
        self.selector, self.cost = selector, float(cost)

    def choose(self, x: torch.Tensor) -> torch.Tensor:
        return self.selector(x).argmax(1)

    def route(self, x: torch.Tensor, variants: Sequence[nn.Module], costs: torch.Tensor) -> Routing:
        choices = self.choose(x)
        return Routing(run_grouped(x, choices, variants), choices, costs[choices] + self.cost)


class EscalationRouter(nn.Module):
    """Run one entry variant on every input; an ``OutputSelector`` reads its logits and either
    keeps them (choice 0) or runs one dearer variant (choice c runs variant ``entry + c``). An
    input pays the entry variant plus the one it was sent to, plus the selector's own ``cost``.

    ``entry`` is the dearest variant the budget affords on every input (``entry_for``): below the
    second variant's cost that is the cheapest one; above it, escalating from the cheapest would pay
    for a variant whose answer is then mostly thrown away. An input whose entry logits are not
    finite is always escalated to the dearest variant: its cheap answer is no answer."""

    def __init__(self, selector: nn.Module, cost: float = 0.0, entry: int = 0) -> None:
        super().__init__()
        if entry < 0:
            raise ValueError(f"entry={entry}: the index of a variant, 0 for the cheapest")
        self.selector, self.cost, self.entry = selector, float(cost), int(entry)

    def route(self, x: torch.Tensor, variants: Sequence[nn.Module], costs: torch.Tensor) -> Routing:
        if self.entry >= len(variants) - 1:
            raise ValueError(f"entry={self.entry} leaves nothing to escalate to among {len(variants)} variants")
        first = variants[self.entry](x)
        broken = ~torch.isfinite(first).all(1)
        choices = self.entry + self.selector(torch.nan_to_num(first)).argmax(1)
        choices[broken] = len(variants) - 1
        out = first.clone()
        up = choices > self.entry
        if up.any():  # the escalated inputs go through the shared grouping, each to its variant
            out[up] = run_grouped(x[up], choices[up], variants)
        return Routing(out, choices, escalation_costs(costs, self.entry)[choices] + self.cost)


def escalation_costs(costs: torch.Tensor, entry: int = 0) -> torch.Tensor:
    """Per-input cost of each variant when variant ``entry`` always runs first (variants cheaper
    than the entry are never chosen; their entries are what they would cost after it)."""
    out = costs + costs[entry]
    out[entry] = costs[entry]
    return out


def entry_for(costs: torch.Tensor, target: float) -> int:
    """The dearest variant whose cost fits ``target``, short of the dearest one (something must
    be left to escalate to); the cheapest when none fits."""
    fits = [i for i, c in enumerate(costs.tolist()) if c <= target]
    return min(max(fits, default=0), len(costs) - 2)


class CascadeRouter(nn.Module):
    """The threshold baseline: run the cheapest variant; while the current prediction's entropy
    exceeds ``threshold``, run the next dearer variant. An input pays for every stage it ran."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = float(threshold)
        self.cost = 0.0

    def route(self, x: torch.Tensor, variants: Sequence[nn.Module], costs: torch.Tensor) -> Routing:
        idx = torch.arange(x.shape[0])
        logits = variants[0](x)
        out = logits.clone()
        choices = torch.zeros(x.shape[0], dtype=torch.long)
        cost = costs[0].expand(x.shape[0]).clone()
        for k in range(1, len(variants)):
            hard = entropy(logits.float()) > self.threshold  # DynaDFQ's difficulty
            if not hard.any():
                break
            idx = idx[hard]
            logits = variants[k](x[idx])
            out[idx] = logits
            choices[idx] = k
            cost[idx] += costs[k]
        return Routing(out, choices, cost)


class DynamicQuantModel(nn.Module):
    """Quantized variants of one model (students while training, converted models to deploy) and
    a router; ``forward`` returns logits in input order. ``last_routing`` keeps the last batch's
    choices and per-input bit-FLOPs.

    ``variants`` maps a label (``"w4a4"``) to its model and ``costs`` the label to its bit-FLOPs
    per input; variants are ordered cheapest first.
    """

    def __init__(self, variants: Mapping[str, nn.Module], costs: Mapping[str, float], router: nn.Module) -> None:
        super().__init__()
        missing = set(variants) - set(costs)
        if missing:
            raise ValueError(f"no bit-FLOPs given for variants {sorted(missing)}; pass costs for every variant")
        if len(variants) < 2:
            raise ValueError("a dynamic model needs at least two variants")
        order = sorted(variants, key=lambda k: costs[k])
        self.labels = order
        self.variants = nn.ModuleList([variants[k] for k in order])
        self.register_buffer("costs", torch.tensor([float(costs[k]) for k in order], dtype=torch.float64))
        self.router = router
        self.last_routing: Routing | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.router.route(x, list(self.variants), self.costs)
        self.last_routing = routing
        return routing.logits

    @torch.no_grad()
    def forward_all(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Every variant's logits in batches, stacked (variants, N, classes): what the selector
        trains on and what the oracle compares."""
        return torch.stack([torch.cat([v(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])
                            for v in self.variants])

    def with_router(self, router: nn.Module) -> DynamicQuantModel:
        """The same variants (shared, not copied) behind another router."""
        return DynamicQuantModel(dict(zip(self.labels, self.variants, strict=True)),
                                 dict(zip(self.labels, self.costs.tolist(), strict=True)), router)
