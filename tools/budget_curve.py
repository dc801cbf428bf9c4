"""Top-1 against the fine-tuning budget, one line per distiller and seed, from `dfq bench --json` records.

Each budget is its own run (the cosine LR schedule spans the whole run, so a 1,000-step run is not the
first half of a 2,000-step one). Used for issue 26's Causal-DFQ against GDFQ at a converged budget:

    .venv/bin/python tools/budget_curve.py bench-out/converge-*.json \
        --rows noise+gdfq,noise+causal --out results/claims/causal-vs-gdfq-budget --title "ResNet-20 PT2E W4A4, noise start"

writes OUT.md (a table) and OUT.png (the curve).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def load_points(paths: list[Path], rows: set[str] | None = None,
                label_keys: tuple[str, ...] = ()) -> dict[tuple[str, int], dict[int, dict]]:
    """(row, seed) -> steps -> record, for the records that ran a distiller (only ``rows`` if given);
    a distiller option in ``label_keys`` that a record sets goes into its row's name."""
    points: dict[tuple[str, int], dict[int, dict]] = defaultdict(dict)
    for path in paths:
        for rec in json.loads(path.read_text())["records"]:
            if not rec.get("distill"):
                continue
            row = f"{rec['source']}+{rec['distill']}"
            if rows and row not in rows:
                continue
            options = rec.get("distill_config") or {}
            row += "".join(f" ({k}={options[k]})" for k in label_keys if k in options)
            points[(row, int(rec["seed"]))][int(rec["distill_steps"])] = rec
    return points


def table(points: dict[tuple[str, int], dict[int, dict]]) -> str:
    budgets = sorted({s for by_steps in points.values() for s in by_steps})
    head = "| row | seed | " + " | ".join(f"{b} steps" for b in budgets) + " |"
    lines = [head, "|" + "---|" * (len(budgets) + 2)]
    for (row, seed), by_steps in sorted(points.items()):
        cells = []
        for b in budgets:
            rec = by_steps.get(b)
            cells.append(f"{rec['top1']:.2f} ({rec['distill_seconds'] / 60:.0f} min)" if rec else "")
        lines.append(f"| {row} | {seed} | " + " | ".join(cells) + " |")
    first = next(iter(next(iter(points.values())).values()))
    note = (f"\n{first['model']} on {first['testset']} (FP {first['fp_top1']:.2f}), {first['toolchain']} "
            f"{first['scheme']}, {first['images']} images; top-1 after distillation (minutes of the loop).\n")
    return "\n".join(lines) + "\n" + note


def plot(points: dict[tuple[str, int], dict[int, dict]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for (row, seed), by_steps in sorted(points.items()):
        steps = sorted(by_steps)
        ax.plot(steps, [by_steps[s]["top1"] for s in steps], "-o" if seed == 0 else "--s",
                label=f"{row}, seed {seed}")
    starts = sorted({(int(rec["seed"]), rec["top1_calibrated"]) for by_steps in points.values()
                     for rec in by_steps.values() if rec.get("top1_calibrated") is not None})
    for seed, top1 in starts:  # the student every loop started from: a loop under it made things worse
        ax.axhline(top1, color="grey", linestyle=":", linewidth=1.0, label=f"calibrated start, seed {seed}: {top1:.2f}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("fine-tuning steps (batch 64), one run per budget")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out.with_suffix(".png.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    tmp.replace(out.with_suffix(".png"))
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="path without suffix; .md and .png are written")
    ap.add_argument("--rows", default="", help="comma-separated rows to keep, e.g. noise+gdfq,noise+causal")
    ap.add_argument("--label-keys", default="style_diversity",
                    help="comma-separated distiller options that name a row apart when a record sets them")
    ap.add_argument("--title", default="top-1 against the fine-tuning budget")
    args = ap.parse_args()
    points = load_points(args.records, {r for r in args.rows.split(",") if r} or None,
                         tuple(k for k in args.label_keys.split(",") if k))
    if not points:
        raise SystemExit("no distilled rows in these records; pass the JSON files `dfq bench --json` wrote")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    md = table(points)
    tmp = args.out.with_suffix(".md.tmp")
    tmp.write_text(md)
    tmp.replace(args.out.with_suffix(".md"))
    plot(points, args.out, args.title)
    print(md)


if __name__ == "__main__":
    main()
