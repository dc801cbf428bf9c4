"""Markdown tables of bench records: mean and spread over seeds, baselines side by side."""
from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any


def markdown_table(records: list[dict[str, Any]]) -> str:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["model"], r["testset"], r["toolchain"], r["scheme"], r["source"], r.get("distill"),
                r["images"], r.get("steps", 0))].append(r)
    lines = ["| model | test set | toolchain | scheme | source | images | steps | seeds | top-1 mean | spread "
             "(min-max) | FP top-1 | synth s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(groups, key=lambda k: (k[0], k[2], k[3], _source_order(k[4]))):
        rs = groups[key]
        tops = [r["top1"] for r in rs]
        spread = f"{min(tops):.2f}-{max(tops):.2f}" if len(tops) > 1 else "-"
        seeds = ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))
        source = key[4] + (f"+{key[5]}" if key[5] else "")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {source} | {key[6]} | {key[7]} | {seeds} | "
                     f"{statistics.mean(tops):.2f} | {spread} | {rs[0]['fp_top1']:.2f} | "
                     f"{statistics.mean(r['synth_seconds'] for r in rs):.1f} |")
    return "\n".join(lines)


def _source_order(source: str) -> tuple[int, str]:
    return ({"real": 0, "noise": 1}.get(source, 2), source)
