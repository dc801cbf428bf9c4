"""Range observers for FX (torch.ao) and PT2E (torchao) built from the scheme's observer choices.

torch.ao and torchao ship MinMax and Histogram observers but no weight observer that searches a
clipping range; ``MSEPerChannelObserver`` adds one as a subclass of each toolchain's own
``PerChannelMinMaxObserver``, so prepare/convert treat it as theirs (``calculate_qparams``,
``min_val``/``max_val`` and the state dict are unchanged).
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from dfq_plugins.quant.rangesearch import search_channel_ranges

_SYMMETRIC = (torch.per_channel_symmetric, torch.per_tensor_symmetric)


def _mse_forward(self: Any, x_orig: torch.Tensor) -> torch.Tensor:
    """Each call sees the whole weight, so the searched range replaces (not widens) the last one."""
    if x_orig.numel() == 0:
        return x_orig
    x = x_orig.detach().to(self.min_val.dtype if self.min_val.is_floating_point() else torch.float32)
    per_channel = self.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)
    axis = self.ch_axis if per_channel else 0
    flat = x if per_channel else x.reshape(1, -1)
    # the NaN check reads a value on the host: free on the CPU, once per observer elsewhere (a weight
    # that turns NaN in training does so through a NaN loss, which the training loop catches)
    check = x.device.type == "cpu" or not getattr(self, "_weights_checked", False)
    lo, hi = search_channel_ranges(flat, axis, self.quant_min, self.quant_max, self.qscheme in _SYMMETRIC,
                                   check_finite=check)
    self._weights_checked = True
    if not per_channel:
        lo, hi = lo[0], hi[0]
    self.min_val.resize_(lo.shape)
    self.max_val.resize_(hi.shape)
    self.min_val.copy_(lo)
    self.max_val.copy_(hi)
    return x_orig


@functools.cache
def mse_observer_class(flavour: str) -> tuple[type, type]:
    """(per-channel, per-tensor) MSE observers for ``"fx"`` (torch.ao) or ``"pt2e"`` (torchao) observers."""
    if flavour == "fx":
        from torch.ao.quantization.observer import (
            MinMaxObserver,
            PerChannelMinMaxObserver,
        )
    elif flavour == "pt2e":
        from torchao.quantization.pt2e import MinMaxObserver, PerChannelMinMaxObserver
    else:
        raise ValueError(f"flavour must be 'fx' or 'pt2e', got {flavour!r}")
    per_channel = type("MSEPerChannelObserver", (PerChannelMinMaxObserver,), {
        "forward": _mse_forward, "__module__": __name__,
        "__doc__": "Per-channel weight range from an Lp clipping search (dfq_plugins.quant.rangesearch)."})
    per_tensor = type("MSEMinMaxObserver", (MinMaxObserver,), {
        "forward": _mse_forward, "__module__": __name__,
        "__doc__": "Per-tensor weight range from an Lp clipping search."})
    return per_channel, per_tensor


@functools.cache
def histogram_observer_class(flavour: str) -> type:
    """The toolchain's ``HistogramObserver``, searching for the scheme's bit-width.

    The stock observer sizes its L2 search for the dtype's 256 levels whatever ``quant_min`` and
    ``quant_max`` say, so at 4 bits it picks an 8-bit clipping range; this one searches with the
    narrowed range's own number of levels.
    """
    if flavour == "fx":
        from torch.ao.quantization.observer import HistogramObserver
    else:
        from torchao.quantization.pt2e import HistogramObserver

    class BitwidthHistogramObserver(HistogramObserver):
        __doc__ = histogram_observer_class.__doc__

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.dst_nbins = int(self.quant_max - self.quant_min + 1)

    return BitwidthHistogramObserver


def weight_observer(flavour: str, kind: str, per_channel: bool, trainable: bool) -> type:
    """The weight observer class for a scheme's ``weight_observer`` (resolved: minmax or mse)."""
    if kind == "mse":
        per_ch, per_t = mse_observer_class(flavour)
        return per_ch if per_channel else per_t
    if flavour == "fx":
        from torch.ao.quantization import observer as obs
    else:
        from torchao.quantization import pt2e as obs
    if trainable:
        return obs.MovingAveragePerChannelMinMaxObserver if per_channel else obs.MovingAverageMinMaxObserver
    return obs.PerChannelMinMaxObserver if per_channel else obs.MinMaxObserver


def activation_observer(flavour: str, kind: str, trainable: bool) -> type:
    """The activation observer for ``act_observer`` (minmax or histogram); QAT students average MinMax."""
    if flavour == "fx":
        from torch.ao.quantization import observer as obs
    else:
        from torchao.quantization import pt2e as obs
    if trainable:  # a histogram search every training step would dominate the step
        return obs.MovingAverageMinMaxObserver
    return histogram_observer_class(flavour) if kind == "histogram" else obs.MinMaxObserver


__all__ = ["activation_observer", "mse_observer_class", "weight_observer"]
