"""``dfq bench`` and ``dfq speed``: sources compared on the real test set; synthesis and distiller steps against their floors."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .. import distributed
from ..recipes import split_list
from .common import DEFAULTS, add_common_args, placed_model, settings, source_arg


def cmd_bench(args: argparse.Namespace) -> int:
    from ..bench import BenchPlan, run_bench
    from ..bench.harness import parse_pairs
    from ..bench.report import bench_report

    s = settings(args, "bench")
    rows = split_list(s.get("rows"))
    plan = BenchPlan(
        model=s["model"], toolchains=split_list(s["toolchain"]), schemes=split_list(s["scheme"]),
        sources=split_list(s["source"]), images=int(s["images"]),
        seeds=[int(v) for v in split_list(s.get("seeds", "0"))], batch_size=int(s["batch_size"]),
        source_configs=s["sources"], toolchain_configs=s["toolchains"], test_limit=s.get("test_limit"),
        distills=[d or None for d in split_list(s.get("distill"))] or [None], distill_configs=s["distillers"],
        distill_steps=int(s["steps"]) if s.get("steps") else None, pairs=parse_pairs(rows) if rows else None,
        distill_seeds={k: [int(v) for v in split_list(v)] for k, v in (s.get("row_seeds") or {}).items()},
        device=s.get("device"),
    )
    json_path = Path(s["json"]) if s.get("json") else None
    records = run_bench(plan, json_path, progress=not args.quiet)
    mine = [r for r in records if r["model"] == plan.model]
    table = bench_report(mine)
    print(table)
    md = s.get("md") or (json_path.with_suffix(".md") if json_path else None)
    if md and distributed.current().is_main:
        from ..io import atomic_write_text

        atomic_write_text(Path(md), table + "\n")
        print(f"wrote {json_path} and {md}")
    return 0


def cmd_speed(args: argparse.Namespace) -> int:
    from ..io import atomic_write_text

    s = settings(args, "speed")
    model, spec, _entry = placed_model(s)
    if s.get("distill"):
        rows, table = _distiller_speed_rows(args, s, model, spec)
    else:
        rows, table = _synthesis_speed_rows(args, s, model, spec)
    if rows:
        print(table)
    if args.json:
        key = "distill_speed" if s.get("distill") else "speed"
        atomic_write_text(Path(args.json), json.dumps({key: rows}, indent=1))
        if rows:
            atomic_write_text(Path(args.json).with_suffix(".md"), table + "\n")
    return 0


def _synthesis_speed_rows(args: argparse.Namespace, s: dict[str, Any], model: Any, spec: Any) -> tuple[list, str]:
    from ..api import make_synthesizer
    from ..bench.report import speed_table
    from ..bench.speed import measure_speed
    from ..teacher import Teacher

    rows = []
    for name in split_list(s["source"]):
        synth = make_synthesizer(source_arg(name, s))
        if not synth.has_optimization_loop:
            print(f"{name}: no optimisation loop to time")
            continue
        row = {"model": s["model"], **measure_speed(Teacher(model, spec), synth, args.batch or 128,
                                                    args.iterations, args.repeats)}
        rows.append(row)
        print(f"{name}: {row['images_x_iterations_per_s']} images x iterations/s, floor (bare forward+backward) "
              f"{row['floor_images_x_iterations_per_s']}, ratio {row['ratio_to_floor']}")
    return rows, speed_table(rows)


SPEED_SOURCES: dict[str, dict[str, Any]] = {"diffdfq": {"name": "diffdfq", "base": {"name": "noise"}, "qaware_weight": 0}}


def _distiller_speed_rows(args: argparse.Namespace, s: dict[str, Any], model: Any, spec: Any) -> tuple[list, str]:
    """Each distiller's steady-state step against its floor, on a student calibrated on a cheap set."""
    from ..api import make_distiller, make_toolchain, synthesize
    from ..bench.distill_speed import measure_distiller_speed
    from ..bench.report import distill_speed_table
    from ..scheme import QuantScheme
    from ..teacher import Teacher

    distillers = [make_distiller({"name": n, **s["distillers"].get(n, {})}) for n in split_list(s["distill"])]
    chain, scheme = make_toolchain(s["toolchain"]), QuantScheme.parse(s["scheme"])
    teacher = Teacher(model, spec)
    sets: dict[str, Any] = {}
    rows = []
    for d in distillers:
        # the images do not change the arithmetic: noise, or noise with diffusion levels for diffdfq
        source = (source_arg(split_list(s["source"])[0], s) if args.source
                  else SPEED_SOURCES.get(d.name, {"name": "noise"}))
        key = json.dumps(source, sort_keys=True)
        if key not in sets:
            sets[key] = synthesize(model, source, input_spec=spec, num_samples=max(d.batch_size, 32), batch_size=32,
                                   seed=0, progress=not args.quiet)
        cs = sets[key]
        student = chain.quantize(model, scheme, cs, trainable=True)
        row = {"model": s["model"], "toolchain": chain.name, "scheme": chain.resolve_scheme(scheme, True).name,
               **measure_distiller_speed(teacher, d, student, chain, cs, args.steps, args.repeats)}
        rows.append(row)
        print(f"{d.name}: {row['step_s'] * 1000:.1f} ms per step of {row['batch']}, floor {row['floor_s'] * 1000:.1f} ms, "
              f"ratio {row['ratio_to_floor']}")
    return rows, distill_speed_table(rows)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to ``dfq``'s sub-parsers."""
    sp = sub.add_parser("bench", help="compare sources on the model's real test set")
    add_common_args(sp)
    sp.add_argument("--toolchain", help="comma-separated toolchains")
    sp.add_argument("--scheme", help="comma-separated schemes")
    sp.add_argument("--source", help="comma-separated sources, e.g. real,noise,zeroq")
    sp.add_argument("--seeds", help="comma-separated seeds (default 0)")
    sp.add_argument("--json", help="JSON file of records (resumed if it exists)")
    sp.add_argument("--md", help="Markdown table output (default: beside --json)")
    sp.add_argument("--test-limit", dest="test_limit", type=int, help="evaluate on the first N test images only")
    sp.add_argument("--distill", help="comma-separated distillers to fine-tune each source's student with "
                                      "(kd, adadfq, causal, diffdfq, reconstruct; a chain: reconstruct+kd)")
    sp.add_argument("--steps", type=int, help="fine-tuning steps for every distiller (one budget for all rows)")
    sp.add_argument("--rows", help="explicit SOURCE[+DISTILLER[+DISTILLER]] rows, e.g. "
                                                  "real+kd,noise+adadfq,zeroq,intraq+reconstruct+kd")
    sp.add_argument("--distill-set", dest="distill_set", action="append", metavar="DISTILLER.KEY=VALUE",
                    help="distiller option, e.g. kd.lr=0.001 (repeatable; recipes: [distillers.NAME])")
    sp.set_defaults(func=cmd_bench)

    sp = sub.add_parser("speed", help="synthesis speed, or a distiller's step (--distill), against its compute floor")
    sp.add_argument("--recipe")
    sp.add_argument("--model", help=f"model plugin name (default {DEFAULTS['model']})")
    sp.add_argument("--source", help="comma-separated synthesizers (default zeroq); with --distill, the set the "
                                     "student is calibrated and an offline distiller trains on (default noise)")
    sp.add_argument("--set", action="append", metavar="SOURCE.KEY=VALUE")
    sp.add_argument("--device", help="where to compute: cpu, cuda, cuda:N (default: the CPU)")
    sp.add_argument("--distill", help="comma-separated distillers whose training step to time against its floor "
                                      "(teacher forward + generator and student forward and backward)")
    sp.add_argument("--distill-set", dest="distill_set", action="append", metavar="DISTILLER.KEY=VALUE")
    sp.add_argument("--toolchain", help=f"with --distill: the student's toolchain (default {DEFAULTS['toolchain']})")
    sp.add_argument("--scheme", help=f"with --distill: the student's scheme (default {DEFAULTS['scheme']})")
    sp.add_argument("--batch", type=int, help="synthesis batch (default 128)")
    sp.add_argument("--iterations", type=_positive_int, default=20, help="synthesis iterations timed per repeat")
    sp.add_argument("--steps", type=_positive_int, default=10, help="with --distill: steps timed per repeat")
    sp.add_argument("--repeats", type=_positive_int, default=3)
    sp.add_argument("--quiet", action="store_true")
    sp.add_argument("--json", help="write the measurements here")
    sp.set_defaults(func=cmd_speed)
