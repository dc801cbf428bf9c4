"""Figures the harness writes: per-sample difficulty of a synthetic set beside the real pool's."""
from __future__ import annotations

from pathlib import Path

import torch

from ..io import atomic_write


def difficulty_histogram(path: Path, sets: dict[str, torch.Tensor], title: str, bins: int = 30) -> Path:
    """Overlaid, density-normalised histograms of teacher-prediction entropy (nats), one per set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max(float(v.max()) for v in sets.values())
    edges = torch.linspace(0.0, max(top, 1e-3), bins + 1).tolist()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, values in sets.items():
        v = values.detach().float()
        ax.hist(v.numpy(), bins=edges, density=True, histtype="step", linewidth=1.6,
                label=f"{label} (n={v.numel()}, mean {float(v.mean()):.3f})")
    ax.set_xlabel("difficulty: entropy of the teacher's prediction (nats)")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(Path(path), lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return Path(path)


__all__ = ["difficulty_histogram"]
