"""Scheme options NNCF has no switch for, applied to its quantized Torch model after ``nncf.quantize``.

- ``weight_observer="mse"``: NNCF sets weight scales by MinMax; each weight quantizer's scale is
  then shrunk per channel to the Lp-best value, measured with NNCF's own quantize op.
- Protocol A: the quantizers on the model's inputs are removed from NNCF's hook storage, so
  the first conv reads the float image (its weights stay quantized).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from dfq_plugins.quant.rangesearch import LP_NORM, SHRINK_GRID

HOOKS = "__nncf_hooks"


def _hooks(model: nn.Module) -> nn.Module | None:
    for name, module in model.named_modules():
        if name.endswith(HOOKS):
            return module
    return None


def _layer_of(model: nn.Module, hook_key: str) -> nn.Module | None:
    """``layer1/0/conv1/conv2d/0__1`` -> the module ``layer1.0.conv1`` (inside a wrapper too)."""
    path = hook_key.rsplit("/", 2)[0].replace("/", ".")
    for prefix in ("", "inner."):
        try:
            return model.get_submodule(prefix + path)
        except AttributeError:
            continue
    return None


def _set_scale(quantizer: nn.Module, scale: torch.Tensor) -> None:
    storage = quantizer._scale_param_storage
    storage.data.copy_(scale.log() if getattr(quantizer, "_is_using_log_scale_storage", False) else scale)


def layers_without_weight_quantizer(model: nn.Module) -> list[str]:
    """Conv/linear modules NNCF left without a weight quantizer: NNCF quantizes only the operations
    its trace of the calibration data reached, so a branch the data never took stays float (and the
    activation ranges after it were fitted to the other path)."""
    hooks = _hooks(model)
    if hooks is None:
        return []
    covered = {id(_layer_of(model, key)) for key in hooks.pre_hooks if key.endswith("__1")}
    weighted = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    return [name for name, m in model.named_modules() if isinstance(m, weighted) and id(m) not in covered
            and HOOKS not in name]


@torch.no_grad()
def search_weight_scales(model: nn.Module, p: float = LP_NORM) -> int:
    """Shrink every per-channel weight quantizer's scale to the Lp-best one; returns how many."""
    hooks = _hooks(model)
    if hooks is None:
        return 0
    searched = 0
    for key, slot in hooks.pre_hooks.items():
        if not key.endswith("__1"):  # port 1 of conv/linear is the weight
            continue
        layer = _layer_of(model, key)
        weight = getattr(layer, "weight", None)
        for quantizer in slot.values():
            if weight is None or not hasattr(quantizer, "_scale_param_storage"):
                continue
            if not hasattr(quantizer, "scale") or type(quantizer).__name__ != "SymmetricQuantizer":
                continue
            s0 = quantizer.scale.detach().clone()
            best_err = torch.full((weight.shape[0],), float("inf"), device=weight.device)
            best = s0.clone()
            for shrink in SHRINK_GRID:
                _set_scale(quantizer, s0 * shrink)
                err = (quantizer.quantize(weight) - weight).abs().pow(p).flatten(1).sum(1)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = torch.where(better.view(-1, *[1] * (s0.dim() - 1)), s0 * shrink, best)
            _set_scale(quantizer, best)
            searched += 1
    if not searched:
        warnings.warn("weight_observer='mse': found no NNCF weight quantizer to search", stacklevel=2)
    return searched


def remove_input_quantizers(model: nn.Module) -> int:
    """Drop NNCF's quantizers on graph inputs (post-hooks on a node with no op path); returns how many."""
    hooks = _hooks(model)
    if hooks is None:
        return 0
    inputs = [key for key in hooks.post_hooks if "/" not in key]
    for key in inputs:
        del hooks.post_hooks[key]
    return len(inputs)


__all__ = ["remove_input_quantizers", "search_weight_scales"]
