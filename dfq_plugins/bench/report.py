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
    lines = [("| model | test set | toolchain | scheme | source | images | steps | seeds | top-1 mean | spread "
             "(min-max) | FP top-1 | synth s |"),
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


def pivot_table(records: list[dict[str, Any]]) -> str:
    """One row per (model, toolchain, scheme, distill), one column per source: mean (min-max) top-1."""
    sources = sorted({r["source"] for r in records}, key=_source_order)
    cells: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        cells[(r["model"], r["toolchain"], r["scheme"], r.get("distill") or "")][r["source"]].append(r["top1"])
    lines = ["| model | toolchain | scheme | " + " | ".join(sources) + " |",
             "|---|---|---|" + "---|" * len(sources)]
    for key in sorted(cells):
        row = []
        for src in sources:
            tops = cells[key].get(src)
            if not tops:
                row.append("")
            elif len(tops) == 1:
                row.append(f"{tops[0]:.2f}")
            else:
                row.append(f"{statistics.mean(tops):.2f} ({min(tops):.2f}-{max(tops):.2f})")
        scheme = key[2] + (f" +{key[3]}" if key[3] else "")
        lines.append(f"| {key[0]} | {key[1]} | {scheme} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _method(r: dict[str, Any]) -> str:
    """The method, with the teacher's precision when it is not float32."""
    precision = r.get("teacher_precision", "fp32")
    return r["method"] if precision == "fp32" else f"{r['method']} (teacher {precision})"


def speed_table(rows: list[dict[str, Any]]) -> str:
    lines = [("| model | method | batch | iterations | images x iterations / s | floor (bare fwd+bwd) | ratio to floor |"
             " channels-last |"), "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {_method(r)} | {r['batch']} | {r['iterations']} | "
                     f"{r['images_x_iterations_per_s']} | {r['floor_images_x_iterations_per_s']} | "
                     f"{r['ratio_to_floor']} | {r['channels_last']} |")
    return "\n".join(lines)


def distill_speed_table(rows: list[dict[str, Any]]) -> str:
    """One line per distiller: its steady-state step, the floor's parts and the ratio."""
    lines = ["| model | toolchain | scheme | distiller | device | batch | ranges | step ms | floor ms (teacher fwd + "
             "generator fwd/bwd + student fwd/bwd) | ratio to floor |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        parts = [r["teacher_forward_s"], r.get("generator_forward_backward_s"), r["student_forward_backward_s"]]
        shown = " + ".join("-" if p is None else f"{p * 1000:.1f}" for p in parts)
        lines.append(f"| {r['model']} | {r['toolchain']} | {r['scheme']} | {_method(r)} | {r['device']} | {r['batch']} | "
                     f"{r['ranges']} | {r['step_s'] * 1000:.1f} | {r['floor_s'] * 1000:.1f} ({shown}) | "
                     f"{r['ratio_to_floor']} |")
    return "\n".join(lines)


def distill_table(records: list[dict[str, Any]]) -> str:
    """Fine-tuned rows: calibration-only and distilled top-1, steps and training time."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("distill"):
            groups[(r["model"], r["toolchain"], r["scheme"], r["source"], r["distill"], r["images"],
                    r.get("distill_steps"))].append(r)
    header = ("| model | toolchain | scheme | row | images | steps | seeds | calibrated top-1 | distilled top-1 "
              "(min-max) | train s |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], _source_order(k[3]), k[4])):
        rs = groups[key]
        tops = [r["top1"] for r in rs]
        spread = f" ({min(tops):.2f}-{max(tops):.2f})" if len(tops) > 1 else ""
        seeds = ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))
        cal = statistics.mean(r.get("top1_calibrated", float("nan")) for r in rs)
        secs = statistics.mean(r.get("distill_seconds", 0.0) for r in rs)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]}+{key[4]} | {key[5]} | {key[6]} | {seeds} | "
                     f"{cal:.2f} | {statistics.mean(tops):.2f}{spread} | {secs:.0f} |")
    return "\n".join(lines)


def _fractions(values: list[float]) -> str:
    return " / ".join(f"{100 * v:.0f}" for v in values)


def dynamic_table(record: dict[str, Any]) -> str:
    """Fixed-bit variants, the learned selector's sweep and the cascade's, one row per point."""
    labels = record["labels"]
    head = ("| router | setting | avg G bit-FLOPs | top-1 | line between fixed | gain | % real to "
            f"{'/'.join(labels)} | % synthetic (selector set) | precision (oracle) | recall (oracle) |")
    lines = [head, "|" + "---|" * 10]
    g = 1e9

    def pr(values: list[float | None]) -> str:
        return " / ".join("-" if v is None else f"{v:.2f}" for v in values)

    for f in record["fixed"]:
        lines.append(f"| fixed | {f['label']} ({f['distill_steps']} steps) | {f['bit_flops'] / g:.3f} | "
                     f"{f['top1']:.2f} | | | | | | |")
    o = record["oracle"]
    lines.append(f"| oracle | fewest bits agreeing with FP | {o['avg_bit_flops'] / g:.3f} | {o['top1']:.2f} | | | "
                 f"{_fractions(o['fractions_real'])} | | | |")
    for kind, key in (("selector", "target_fraction"), ("cascade", "escalate_fraction")):
        for r in record[kind]:
            line = "" if r["line_top1"] is None else f"{r['line_top1']:.2f}"
            gain = "" if r["gain_over_line"] is None else f"{r['gain_over_line']:+.2f}"
            setting = f"target {r[key]:.2f}" if kind == "selector" else f"escalate {r[key]:.2f}"
            if r.get("entry") not in (None, record["fixed"][0]["label"]):
                setting += f" (from {r['entry']})"
            lines.append(f"| {kind} | {setting} | {r['avg_bit_flops'] / g:.3f} | {r['top1']:.2f} | {line} | {gain} | "
                         f"{_fractions(r['fractions_real'])} | {_fractions(r['fractions_synthetic_selector_set'])} | "
                         f"{pr(r['oracle']['precision'])} | {pr(r['oracle']['recall'])} |")
    t = record["timing"]
    lines += ["", f"Wall clock of one batch of {t['batch']} real images (median of {t['repeats']}, "
                  f"{t['threads']} threads): " + ", ".join(f"{n} {ms:.1f} ms" for n, ms in t["median_ms"].items())]
    return "\n".join(lines)


def bench_report(records: list[dict[str, Any]]) -> str:
    """The Markdown ``dfq bench`` prints and writes: every run, the per-source pivot, fine-tuned rows."""
    table = markdown_table(records) + "\n\nMean top-1 (min-max over seeds) per source:\n\n" + pivot_table(records)
    if any(r.get("distill") for r in records):
        table += "\n\nFine-tuned rows (top-1 after calibration only, then after distillation):\n\n" + \
            distill_table(records)
    return table
