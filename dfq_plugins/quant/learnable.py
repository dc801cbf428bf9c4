"""LSQ-style learned ranges for torch.ao FX and torchao PT2E students, from the toolchains' own classes.

After calibration every ``FakeQuantize`` of the student (weights and activations) is swapped for
the toolchain's learnable fake-quant (torch.ao ``_LearnableFakeQuantize``, torchao
``LearnableFakeQuantize``), started at the calibrated scale and zero point, with LSQ's gradient
scaling. Both are ``FakeQuantizeBase`` subclasses whose ``calculate_qparams`` returns the learned
values, so ``convert_fx`` / ``convert_pt2e`` turn them into the deployable model unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .hostflags import with_host_flags


def _is_plain_fake_quant(module: nn.Module) -> bool:
    """A toolchain FakeQuantize with an observer (not already learnable)."""
    return (hasattr(module, "activation_post_process") and hasattr(module, "calculate_qparams")
            and hasattr(module, "fake_quant_enabled") and not isinstance(getattr(module, "scale", None), nn.Parameter)
            and "Learnable" not in type(module).__name__)


def _learnable_for(flavour: str, old: nn.Module) -> nn.Module:
    scale, zero_point = old.calculate_qparams()
    scale = scale.detach().float().reshape(-1).clone()
    zero_point = zero_point.detach().float().reshape(-1).clone()
    observer = old.activation_post_process
    per_channel = old.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)
    if flavour == "fx":
        from torch.ao.quantization._learnable_fake_quantize import (
            _LearnableFakeQuantize,
        )

        new = with_host_flags(_LearnableFakeQuantize)(
            lambda **_: observer, quant_min=old.quant_min, quant_max=old.quant_max,
            channel_len=scale.numel() if per_channel else -1, use_grad_scaling=True)
        with torch.no_grad():
            new.scale.copy_(scale)
            new.zero_point.copy_(zero_point)
        new.enable_param_learning()
    else:
        from torchao.quantization.pt2e.learnable_fake_quantize import (
            LearnableFakeQuantize,
        )

        new = with_host_flags(LearnableFakeQuantize)(
            lambda **_: observer, quant_min=old.quant_min, quant_max=old.quant_max, use_grad_scaling=True)
        new._initialize_or_update_qparams(scale, zero_point)
        new.enable_range_learning()
    new.fake_quant_enabled.copy_(old.fake_quant_enabled)
    return new.to(old.scale.device)  # built on the CPU; the student may live on a GPU (switches stay on the host)


def make_ranges_learnable(student: nn.Module, flavour: str) -> list[nn.Parameter]:
    """Swap every calibrated FakeQuantize of ``student`` for a learnable one; returns the range parameters.

    Idempotent: a student whose quantizers are already learnable (a resumed run) just returns them.
    """
    if flavour not in ("fx", "pt2e"):
        raise ValueError(f"flavour must be 'fx' or 'pt2e', got {flavour!r}")
    swaps = [(name, m) for name, m in student.named_modules(remove_duplicate=False)
             if name and _is_plain_fake_quant(m)]
    made: dict[int, nn.Module] = {}  # FX registers one fake-quant under several names; keep it shared
    for name, old in swaps:
        parent_name, _, attr = name.rpartition(".")
        parent = student.get_submodule(parent_name) if parent_name else student
        if id(old) not in made:
            made[id(old)] = _learnable_for(flavour, old)
        setattr(parent, attr, made[id(old)])
    return learned_range_parameters(student)


def learned_range_parameters(student: nn.Module) -> list[nn.Parameter]:
    """Scales and zero points of the student's learnable fake-quants (zero points of affine ones only)."""
    params = []
    for m in student.modules():
        if "Learnable" in type(m).__name__ and isinstance(getattr(m, "scale", None), nn.Parameter):
            params.append(m.scale)
            if m.qscheme in (torch.per_tensor_affine, torch.per_channel_affine):
                params.append(m.zero_point)
    return params


def range_param_groups(student: nn.Module, ranges: list[nn.Parameter], lr: float, *,
                       relative: bool) -> list[dict[str, Any]]:
    """Optimiser groups for learned ranges, without weight decay.

    ``relative``: each scale gets ``lr`` times its own mean magnitude (zero points, in integer steps,
    keep ``lr``). Adam moves every parameter by about its LR per step whatever its size, so one
    absolute LR moves an 8-bit weight scale of 1e-3 by 10% per step at 1e-4 while it barely moves
    an activation scale of 0.5; measured: ResNet-20 W2A4 after ``reconstruct``, Adam 1e-4 with
    absolute ranges took agreement with FP from 78% to 28% (docs/claims.md).
    """
    if not relative:
        return [{"params": list(ranges), "weight_decay": 0.0, "lr": lr}]
    scale_ids = {id(m.scale) for m in student.modules()
                 if "Learnable" in type(m).__name__ and isinstance(getattr(m, "scale", None), nn.Parameter)}
    groups, others = [], []
    for p in ranges:
        if id(p) in scale_ids:
            groups.append({"params": [p], "weight_decay": 0.0, "lr": lr * max(float(p.detach().abs().mean()), 1e-8)})
        else:
            others.append(p)
    if others:
        groups.append({"params": others, "weight_decay": 0.0, "lr": lr})
    return groups


def clampable_scales(student: nn.Module, only: set[int] | None = None) -> list[nn.Module]:
    """The learnable fake-quants whose scale ``clamp_scales`` keeps positive (``only``: scale ids)."""
    return [m for m in student.modules()
            if "Learnable" in type(m).__name__ and isinstance(getattr(m, "scale", None), nn.Parameter)
            and (only is None or id(m.scale) in only)]


@torch.no_grad()
def clamp_scales(student: nn.Module, modules: list[nn.Module] | None = None) -> None:
    """Keep learned scales positive after an optimiser step.

    torch.ao's learnable fake-quant clamps its scale in forward, torchao's only in
    ``calculate_qparams``: a scale stepped below zero would fake-quantize with a negative step in
    the student and with ``eps`` in the converted model (seen: an 8-bit weight scale of 1.5e-3
    pushed to -0.018 by a fixed Adam step, and the converted model 7 logits away).
    """
    for m in clampable_scales(student) if modules is None else modules:  # a block's own: no walk of the model
        eps = m.eps
        m.scale.clamp_(min=eps if torch.is_tensor(eps) else float(eps))  # a tensor bound: no host read


def observer_is_on(module: Any) -> bool:
    """Whether a fake-quant module is estimating its range now (torch.ao's learnable one keeps the
    switch in ``static_enabled``; the others in ``observer_enabled``)."""
    flag = getattr(module, "static_enabled", None)
    if not isinstance(flag, torch.Tensor):
        flag = getattr(module, "observer_enabled", None)
    return isinstance(flag, torch.Tensor) and hasattr(module, "disable_observer") and bool(flag.any())


__all__ = ["clamp_scales", "clampable_scales", "learned_range_parameters", "make_ranges_learnable", "observer_is_on",
           "range_param_groups"]
