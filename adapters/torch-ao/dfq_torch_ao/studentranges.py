"""A fine-tuned student's starting activation ranges from the scheme's histogram search.

A trainable student's activation fake-quants hold moving-average MinMax observers, because a
histogram search at every training step would dominate the step. Calibrated through them, a
W4A4 student starts from MinMax ranges even where its scheme says ``ahist``: EfficientNet-Lite0
W4A4 started ``reconstruct`` at 5.0% top-1, where post-training calibration with the histogram
search scored 59.4. So after the usual calibration pass, one more pass in full precision feeds
each activation quantizer's own-bit-width histogram observer (the one post-training uses), and
its searched range becomes the student's: the moving-average observer's min/max are set to it,
so ``calculate_qparams`` (and the learned ranges ``reconstruct`` starts from) return it, and an
observer left on continues from it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from dfq_plugins.data import CalibrationSet
from dfq_plugins.quant.protocols import is_weight_observer, observer_of
from dfq_plugins.toolchain import run_calibration

from .observers import histogram_observer_class


def _activation_fake_quants(student: fx.GraphModule) -> list[nn.Module]:
    seen: dict[int, nn.Module] = {}
    for node in student.graph.nodes:
        fq = observer_of(student, node)
        if fq is None or is_weight_observer(node) or not hasattr(fq, "fake_quant_enabled"):
            continue
        if int(fq.fake_quant_enabled[0]) and fq.qscheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            seen.setdefault(id(fq), fq)
    return list(seen.values())


@torch.no_grad()
def calibrate_activations_by_histogram(student: fx.GraphModule, calibration_set: CalibrationSet,
                                       flavour: str) -> int:
    """Set every activation quantizer's range from a histogram search on FP activations; returns how many."""
    targets = _activation_fake_quants(student)
    if not targets:
        return 0
    hist_class = histogram_observer_class(flavour)
    device = targets[0].scale.device
    observers = []
    for fq in targets:
        obs = fq.activation_post_process
        observers.append(hist_class(dtype=obs.dtype, qscheme=obs.qscheme, quant_min=fq.quant_min,
                                    quant_max=fq.quant_max, eps=float(obs.eps)).to(device))
    switches = [m for m in student.modules() if hasattr(m, "fake_quant_enabled") and hasattr(m, "observer_enabled")]
    saved = [(int(m.fake_quant_enabled[0]), int(m.observer_enabled[0])) for m in switches]
    hooks = [fq.register_forward_pre_hook(lambda _m, args, h=h: h(args[0].detach()))
             for fq, h in zip(targets, observers)]
    try:
        for m in switches:  # the FP network, as post-training observers see it
            m.fake_quant_enabled[0] = 0
            m.observer_enabled[0] = 0
        run_calibration(student, calibration_set)
    finally:
        for hook in hooks:
            hook.remove()
        for m, (fake_quant, observe) in zip(switches, saved):
            m.fake_quant_enabled[0] = fake_quant
            m.observer_enabled[0] = observe
    done = 0
    for fq, hist in zip(targets, observers):
        if not torch.isfinite(hist.min_val).all() or not torch.isfinite(hist.max_val).all():
            continue  # never reached by the calibration set (a dead branch): keep its MinMax range
        scale, zero_point = hist.calculate_qparams()
        low = (fq.quant_min - zero_point.float()) * scale
        high = (fq.quant_max - zero_point.float()) * scale
        obs = fq.activation_post_process
        obs.min_val.copy_(low.reshape(obs.min_val.shape).to(obs.min_val))
        obs.max_val.copy_(high.reshape(obs.max_val.shape).to(obs.max_val))
        new_scale, new_zero_point = obs.calculate_qparams()
        fq.scale.copy_(new_scale.reshape(fq.scale.shape))
        fq.zero_point.copy_(new_zero_point.reshape(fq.zero_point.shape))
        done += 1
    return done


def histogram_ranges_wanted(prepared: Any) -> bool:
    """Whether ``prepare`` marked this trainable student's scheme as asking for histogram activations."""
    return bool(getattr(prepared, "_dfq_student_act_histogram", False))


__all__ = ["calibrate_activations_by_histogram", "histogram_ranges_wanted"]
