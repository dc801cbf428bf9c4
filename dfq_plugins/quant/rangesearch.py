"""Per-channel clipping search for weight ranges (the MSE/Lp initialisation of BRECQ, Genie and NNCF).

MinMax spends a 4-bit grid on the few largest weights of each channel; shrinking the range and
clipping those outliers lowers the quantization error of the rest. The search tries shrink
factors ``1.00, 0.99, ... 0.21`` of each channel's range (BRECQ's grid) and keeps, per channel,
the one with the lowest Lp error, computed with the same fake-quant op and qparams formula the
toolchains use, so the chosen range is exactly what the converted model applies.
"""
from __future__ import annotations

import torch

SHRINK_GRID = tuple(1.0 - 0.01 * i for i in range(80))
LP_NORM = 2.4  # BRECQ's choice: between MSE and a max-error criterion


def _qparams(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool,
             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.ao's ``_calculate_qparams`` for signed (qint8) symmetric or affine ranges."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        scale = (torch.maximum(-lo, hi) / ((qmax - qmin) / 2)).clamp_min(eps)
        zero = torch.zeros_like(scale, dtype=torch.int32)
        if qmin >= 0:  # an unsigned symmetric range is centred
            zero = zero + (qmin + qmax + 1) // 2
        return scale, zero
    scale = ((hi - lo) / float(qmax - qmin)).clamp_min(eps)
    zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero


@torch.no_grad()
def search_channel_ranges(w: torch.Tensor, ch_axis: int, qmin: int, qmax: int, symmetric: bool,
                          p: float = LP_NORM, eps: float = torch.finfo(torch.float32).eps,
                          grid: tuple[float, ...] = SHRINK_GRID,
                          check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (min, max) that minimise ``sum |w - fq(w)|^p`` over the shrink grid.
    ``check_finite=False`` skips the NaN check, a host sync (for a weight already checked on a GPU)."""
    if check_finite and not torch.isfinite(w).all():
        raise ValueError("weight tensor holds NaN or inf; a range search on it is meaningless")
    x = w.detach().float().transpose(0, ch_axis).flatten(1)  # (channels, rest)
    lo0, hi0 = x.min(1).values, x.max(1).values
    best_err = torch.full_like(lo0, float("inf"))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for shrink in grid:
        lo, hi = lo0 * shrink, hi0 * shrink
        scale, zero = _qparams(lo, hi, qmin, qmax, symmetric, eps)
        q = torch.fake_quantize_per_channel_affine(x, scale, zero, 0, qmin, qmax)
        err = (q - x).abs().pow(p).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    return best_lo, best_hi


__all__ = ["LP_NORM", "SHRINK_GRID", "search_channel_ranges"]
