"""Minibatches drawn from an offline calibration set for fine-tuning, with light augmentation.

Fine-tuning runs thousands of steps over a few hundred images, so each step draws a random
minibatch and, by default, a per-image random shift (zero padding, i.e. the mean pixel in
normalised space) and horizontal flip: the standard CIFAR augmentation, cheap on CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("shift_flip", "flip", "none")


def shift_flip_draws(n: int, g: torch.Generator, pad: int = 4, flip: bool = True) -> dict[str, torch.Tensor]:
    """The random shifts and flips of ``n`` images, drawn from ``g`` on the CPU."""
    draws = {"pad": torch.tensor(pad)}
    if pad > 0:
        draws["dy"] = torch.randint(0, 2 * pad + 1, (n,), generator=g)
        draws["dx"] = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    if flip:
        draws["flip"] = torch.rand(n, generator=g) < 0.5
    return draws


def apply_shift_flip(x: torch.Tensor, draws: dict[str, torch.Tensor],
                     rows: torch.Tensor | None = None) -> torch.Tensor:
    """``draws`` applied to ``x``; ``rows``: which of the drawn images ``x``'s rows are (a rank's share)."""
    pick = (lambda t: t) if rows is None else (lambda t: t[rows])
    n, _, h, w = x.shape
    pad = int(draws["pad"])
    if pad > 0:
        dy, dx = pick(draws["dy"]), pick(draws["dx"])
        padded = F.pad(x, (pad, pad, pad, pad))
        rows_idx = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * pad)
        x = padded.gather(2, rows_idx.to(x.device))
        cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
        x = x.gather(3, cols.to(x.device))
    if "flip" in draws:
        mask = pick(draws["flip"])
        x = torch.where(mask.view(n, 1, 1, 1).to(x.device), x.flip(3), x)
    return x


def shift_flip(x: torch.Tensor, g: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Per-image random crop of the zero-padded image (same size) and random horizontal flip.

    The draws come from ``g`` on the CPU, whatever ``x``'s device: the same seed gives the same
    crops everywhere."""
    return apply_shift_flip(x, shift_flip_draws(x.shape[0], g, pad, flip))


def sample_batch(images: torch.Tensor, size: int, g: torch.Generator, augment: str = "shift_flip",
                 extra: tuple[torch.Tensor | None, ...] = (), device: torch.device | None = None,
                 ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """A random minibatch of ``images`` (and the same rows of each ``extra`` tensor), on ``device``
    (the set stays on the CPU; only the minibatch moves, then is augmented there)."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment={augment!r}; choose one of {AUGMENTATIONS}")
    idx = torch.randint(0, images.shape[0], (size,), generator=g)
    x = images[idx] if device is None else images[idx].to(device)
    if x.dim() == 4 and augment != "none":
        x = shift_flip(x, g, pad=4 if augment == "shift_flip" else 0)
    rows = [None if t is None else t[idx] for t in extra]
    return x, rows if device is None else [None if t is None else t.to(device) for t in rows]
