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


__all__ = ["difficulty_histogram", "dynamic_plot"]


def dynamic_plot(path: Path, record: dict) -> Path:
    """Accuracy against average bit-FLOPs: fixed-bit variants (joined by straight lines), the
    learned selector's sweep, the entropy-threshold cascade, the oracle and full precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = 1e9
    fig, ax = plt.subplots(figsize=(7, 4.5))
    fixed = sorted(record["fixed"], key=lambda f: f["bit_flops"])
    ax.plot([f["bit_flops"] / g for f in fixed], [f["top1"] for f in fixed], "k--o", label="fixed bit-widths")
    for f in fixed:
        ax.annotate(f["label"], (f["bit_flops"] / g, f["top1"]), textcoords="offset points", xytext=(4, -12))
    for kind, style in (("selector", "-s"), ("cascade", "-^")):
        rows = sorted(record[kind], key=lambda r: r["avg_bit_flops"])
        name = "learned selector" if kind == "selector" else "entropy-threshold cascade"
        ax.plot([r["avg_bit_flops"] / g for r in rows], [r["top1"] for r in rows], style, label=name)
    o = record["oracle"]
    ax.plot([o["avg_bit_flops"] / g], [o["top1"]], "*", markersize=12, label="oracle routing")
    ax.axhline(record["fp_top1"], color="grey", linewidth=0.8, label=f"full precision {record['fp_top1']:.2f}")
    cfg = record["config"]
    ax.set_xlabel("average bit-FLOPs per image (G)")
    ax.set_ylabel(f"top-1 on {cfg['testset']} (%)")
    ax.set_title(f"{cfg['model']}, {cfg['toolchain']}: dynamic bit-widths, {cfg['source']} data", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(Path(path), lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    return Path(path)
