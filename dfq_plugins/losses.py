"""Losses shared by synthesizers and distillers, written for the CPU hot loop."""
from __future__ import annotations

import torch


class _ChannelStats(torch.autograd.Function):
    """Per-channel mean and biased variance of an NCHW tensor over (N, H, W).

    ``torch.var_mean(x, dim=(0, 2, 3))`` reduces across strided memory and costs more than the
    convolution it follows on CPU (6.2 ms against 0.56 ms here for a 128x16x32x32 tensor). This
    reduces the contiguous H*W axis first, and its backward is one fused ``addcmul`` pass.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.numel() // x.shape[1]
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            flat = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # a view: channels are innermost
            s1, s2 = flat.sum(0), (flat * flat).sum(0)
        else:
            s1 = x.sum(dim=(2, 3)).sum(0)
            s2 = (x * x).sum(dim=(2, 3)).sum(0)
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0.0)
        ctx.save_for_backward(x, mean)
        ctx.n = n
        return mean, var

    @staticmethod
    def backward(ctx, g_mean: torch.Tensor, g_var: torch.Tensor) -> torch.Tensor:
        x, mean = ctx.saved_tensors
        n = ctx.n
        if g_mean is None:
            g_mean = torch.zeros_like(mean)
        if g_var is None:
            g_var = torch.zeros_like(mean)
        scale = (2.0 / n) * g_var
        shift = g_mean / n - scale * mean
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.view(shape), x, scale.view(shape))


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) per channel of an (N, C, ...) tensor, differentiable."""
    if x.dim() == 2:
        x = x[:, :, None, None]
    elif x.dim() != 4:
        x = x.flatten(2)[..., None]
    return _ChannelStats.apply(x)


# --- distillation losses -----------------------------------------------------------------------
KD_REDUCTIONS = ("mean", "batchmean")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 20.0,
            reduction: str = "batchmean") -> torch.Tensor:
    """T^2 KL(p_teacher^T || p_student^T).

    ``reduction="mean"`` is GDFQ's (PyTorch's default, divides by batch x classes: C times weaker);
    ``batchmean`` is IntraQ/HAST/DiffDFQ's textbook KD. Both exist in published recipes.
    """
    if reduction not in KD_REDUCTIONS:
        raise ValueError(f"KD reduction {reduction!r}; choose one of {KD_REDUCTIONS}")
    t = temperature
    log_q = torch.log_softmax(student_logits / t, dim=1)
    p = torch.softmax(teacher_logits.detach() / t, dim=1)
    return torch.nn.functional.kl_div(log_q, p, reduction=reduction) * t * t


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row entropy (nats) of softmax(logits)."""
    log_p = torch.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(1)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a probability target (rows sum to 1)."""
    return -(target * torch.log_softmax(logits, dim=1)).sum(1).mean()
