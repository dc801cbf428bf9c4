"""BatchNorm-statistics hooks and the BN-statistics loss every inversion method shares.

The hooks record, per BN layer in call order, the statistics of that layer's input: batch
statistics over (N, H, W) (GDFQ family, IntraQ, HAST, Genie, DiffDFQ) or per-image statistics
over (H, W) (ZeroQ's original). They work on the teacher and on a fake-quantized student alike
(any module tree whose BatchNorm layers still run, e.g. ``prepare_qat_fx``'s ConvBn modules).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..losses import channel_stats

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
STATISTICS = ("std", "var")
DISTANCES = ("l2", "mse", "l2_per_channel", "relative")
LAYER_WEIGHTINGS = ("average", "first_layer_multiplier", "sum")


def batchnorm_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _BN_TYPES)]


@dataclass
class LayerStats:
    """Mean and spread (std or var, per the loss) of one BN layer's input, per channel."""

    mean: torch.Tensor
    spread: torch.Tensor


class BNStatsRecorder:
    """Forward pre-hooks that record each BN input's statistics in call order.

    ``per_sample`` gives (N, C) statistics per image instead of (C,) batch statistics. The
    buffer is cleared at the start of every ``record`` block, and hooks are removed on exit.
    """

    def __init__(self, modules: list[nn.Module], statistic: str = "std", per_sample: bool = False,
                 eps: float = 1e-5) -> None:
        if statistic not in STATISTICS:
            raise ValueError(f"statistic={statistic!r}; choose one of {STATISTICS}")
        if not modules:
            raise ValueError("no BatchNorm layer to record statistics from")
        self.modules = modules
        self.statistic = statistic
        self.per_sample = per_sample
        self.eps = eps
        self.stats: list[LayerStats] = []

    def _capture(self, inp: torch.Tensor) -> None:
        inp = inp.float()  # statistics in float32 under a bf16 teacher (a no-op otherwise)
        if self.per_sample:
            var, mean = torch.var_mean(inp.flatten(2), dim=2, unbiased=False)
        else:
            mean, var = channel_stats(inp)
        spread = torch.sqrt(var + self.eps) if self.statistic == "std" else var
        self.stats.append(LayerStats(mean, spread))

    @contextlib.contextmanager
    def record(self) -> Iterator[BNStatsRecorder]:
        self.stats = []
        handles = [m.register_forward_pre_hook(lambda _m, args: self._capture(args[0])) for m in self.modules]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def clear(self) -> None:
        self.stats = []


def running_targets(modules: list[nn.Module], statistic: str = "std") -> list[LayerStats]:
    """The BN layers' running statistics as targets (what the teacher saw in training)."""
    out = []
    for bn in modules:
        var = bn.running_var.detach().float()
        spread = torch.sqrt(var + bn.eps) if statistic == "std" else var
        out.append(LayerStats(bn.running_mean.detach().float(), spread))
    return out


@dataclass
class BNStatsLoss:
    """Distance between recorded statistics and targets, combined over layers.

    distance: ``l2`` (sum of squares over channels, ZeroQ/MCT), ``mse`` (mean over channels,
    GDFQ/IntraQ/HAST), ``l2_per_channel`` (sum / C, Genie), ``relative`` (mean over channels of the
    differences in units of the target spread, so wide, large-valued late layers no longer drown the
    early ones). ``margin`` is a slack below which a per-channel difference costs nothing (DSG-style;
    under ``relative`` it is in the same units). Layer weights are normalised to sum to 1
    (``average``; ``first_layer_multiplier`` up-weights the first layer) or all 1 (``sum``).
    """

    distance: str = "l2"
    layer_weighting: str = "average"
    first_layer_multiplier: float = 10.0
    margin: float = 0.0

    def __post_init__(self) -> None:
        if self.distance not in DISTANCES:
            raise ValueError(f"BN-statistics distance={self.distance!r}; choose one of {DISTANCES}")
        if self.layer_weighting not in LAYER_WEIGHTINGS:
            raise ValueError(f"layer_weighting={self.layer_weighting!r}; choose one of {LAYER_WEIGHTINGS}")
        if self.margin < 0:
            raise ValueError("BN-statistics margin must be >= 0")

    def layer_weights(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Per-layer weights of the loss, on ``device`` (the statistics' device; CPU by default)."""
        w = torch.ones(n, device=device)
        if self.layer_weighting == "first_layer_multiplier":
            w[0] = self.first_layer_multiplier
        return w if self.layer_weighting == "sum" else w / w.sum()

    def _distance(self, diff: torch.Tensor) -> torch.Tensor:
        if self.margin:
            diff = torch.relu(diff.abs() - self.margin)
        sq = diff.pow(2)
        if self.distance == "l2":
            return sq.sum(-1)
        if self.distance in ("mse", "relative"):
            return sq.mean(-1)
        return sq.sum(-1) / diff.shape[-1]

    def __call__(self, stats: list[LayerStats], targets: list[LayerStats],
                 weights: torch.Tensor | None = None) -> torch.Tensor:
        if len(stats) != len(targets):
            raise RuntimeError(f"recorded {len(stats)} BN layers but have {len(targets)} targets: the model "
                               "ran a different set of BN layers than the one the targets came from")
        per_layer = []
        for s, t in zip(stats, targets):
            if self.distance == "relative":  # each channel in units of its target spread: every layer counts alike
                scale = t.spread.abs().clamp_min(1e-3)
                d = self._distance((s.mean - t.mean) / scale) + self._distance((s.spread - t.spread) / scale)
            else:
                d = self._distance(s.mean - t.mean) + self._distance(s.spread - t.spread)
            per_layer.append(d.mean() if d.dim() else d)  # per-sample statistics: mean over images
        w = self.layer_weights(len(per_layer), per_layer[0].device) if weights is None else weights
        return (torch.stack(per_layer) * w).sum()


def detached(stats: list[LayerStats]) -> list[LayerStats]:
    """Statistics used as another model's targets (e.g. the teacher's batch stats for a student)."""
    return [LayerStats(s.mean.detach(), s.spread.detach()) for s in stats]


@torch.no_grad()
def bn_mismatch(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> float | None:
    """How unlike the model's training data a set of images is, as its BatchNorm layers see it.

    Per BN layer, the set's per-channel input mean against the running mean, in running stds,
    averaged over channels, then over layers. Measured: real images 0.10 (ResNet-20/56, Lite0),
    zeroq 0.05, Gaussian noise 0.47 to 0.53. ``None`` for a model without BatchNorm.
    """
    bns = batchnorm_modules(model)
    if not bns:
        return None
    device = next((p.device for p in model.parameters()), images.device)
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def hook(i: int):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0].detach().float().transpose(0, 1).reshape(inputs[0].shape[1], -1)
            sums[i] = sums.get(i, 0) + x.sum(1)
            counts[i] = counts.get(i, 0) + x.shape[1]
        return record

    handles = [bn.register_forward_hook(hook(i)) for i, bn in enumerate(bns)]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, images.shape[0], batch_size):
            model(images[start:start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    per_layer = [((sums[i] / counts[i] - bn.running_mean).abs() / (bn.running_var + bn.eps).sqrt()).mean()
                 for i, bn in enumerate(bns) if i in sums and bn.running_mean is not None]
    return float(torch.stack(per_layer).mean()) if per_layer else None


__all__ = ["BNStatsLoss", "BNStatsRecorder", "LayerStats", "batchnorm_modules", "bn_mismatch", "detached",
           "running_targets"]
