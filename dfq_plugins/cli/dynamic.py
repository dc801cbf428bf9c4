"""``dfq dynamic``: per-input bit-widths (variants, a learned selector, a threshold cascade)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..recipes import apply_overrides, load_recipe, split_list
from .common import add_common_args, settings


def default_dynamic_steps(bits: list[int]) -> dict[int, int]:
    """Fine-tuning budget per bit-width when none is given: 500 steps at 4 bits or fewer, 200
    at 5 to 7, none at 8 (calibration recovers 8 bits)."""
    return {b: 500 if b <= 4 else 200 if b < 8 else 0 for b in bits}


def cmd_dynamic(args: argparse.Namespace) -> int:
    from ..bench.dynamic import DynamicPlan, run_dynamic
    from ..bench.report import dynamic_table
    from ..dynamic import SelectorConfig
    from ..dynamic.build import parse_bits, parse_steps

    s = settings(args, "dynamic")
    recipe = load_recipe(args.recipe) if args.recipe else {}
    bits = parse_bits(s.get("bits") or "4,6,8")
    selector = dict(recipe.get("selector", {}))
    apply_overrides({"selector": selector}, [f"selector.{kv}" for kv in args.selector_set or []])
    distill = s.get("distill") or "kd"
    source = args.source or recipe.get("source") or "dynadfq"  # difficulty-diverse data by default
    extra: dict[str, Any] = {key: [float(v) for v in split_list(s[key])] for key in ("targets", "escalate")
                             if s.get(key)}
    extra.update({key: int(s[key]) for key in ("copies", "selector_bits") if s.get(key)})
    if s.get("references") is not None:
        extra["references"] = split_list(s["references"])
    plan = DynamicPlan(
        model=s["model"], toolchain=s["toolchain"], bits=bits, source=source,
        source_config=s["sources"].get(source, {}), images=int(s["images"]), seed=int(s["seed"]),
        batch_size=int(s["batch_size"]), distill=distill, distill_config=s["distillers"].get(distill, {}),
        steps=parse_steps(s.get("steps"), bits, 0) if s.get("steps") is not None else default_dynamic_steps(bits),
        features=s.get("features") or "image", selector=SelectorConfig.from_dict(selector),
        test_limit=s.get("test_limit"),
        **extra)
    json_path = Path(s["json"]) if s.get("json") else None
    record = run_dynamic(plan, json_path, progress=not args.quiet)
    print(dynamic_table(record))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to ``dfq``'s sub-parsers."""
    sp = sub.add_parser("dynamic", help="per-input bit-widths: variants, a learned selector and a threshold "
                                        "cascade against the fixed-bit variants")
    add_common_args(sp)
    sp.add_argument("--toolchain", help="torch-ao-fx (default), torchao-pt2e or nncf")
    sp.add_argument("--bits", help="candidate bit-widths, weights = activations (default 4,6,8)")
    sp.add_argument("--source", help="synthetic data for variants and selector (default dynadfq)")
    sp.add_argument("--seed", type=int, help="the variants' set; the selector trains on the set of seed + 1")
    sp.add_argument("--distill", help="distiller fine-tuning each variant (default kd)")
    sp.add_argument("--steps", help="fine-tuning steps: one number or BITS:STEPS pairs "
                                    "(default 500 at <=4 bits, 200 at 5-7, 0 at 8)")
    sp.add_argument("--distill-set", dest="distill_set", action="append", metavar="DISTILLER.KEY=VALUE")
    sp.add_argument("--features", help="selector input: image (default), stem, or output (the cheapest "
                                       "variant's logits; it runs on every input)")
    sp.add_argument("--selector-set", dest="selector_set", action="append", metavar="KEY=VALUE",
                    help="selector training option, e.g. penalty=50 (recipes: [selector])")
    sp.add_argument("--targets", help="bit-FLOPs targets for the selector as fractions between the cheapest "
                                      "and the dearest variant (default 0.1,0.2,0.3,0.45,0.6,0.8)")
    sp.add_argument("--escalate", help="cascade: fractions of synthetic images escalated past the cheapest "
                                       "variant (default 0.05,0.1,0.2,0.3,0.5,0.7)")
    sp.add_argument("--copies", type=int, help="augmented views per synthetic image for the selector (default 8)")
    sp.add_argument("--selector-bits", dest="selector_bits", type=int,
                    help="bits the selector is counted at (default 32: it runs in float)")
    sp.add_argument("--references", help="calibration-only fixed-bit baselines from the same run (default "
                                         "real,noise; '' for none)")
    sp.add_argument("--json", help="write the record here (and .md, .png beside it)")
    sp.add_argument("--test-limit", dest="test_limit", type=int, help="evaluate on the first N test images only")
    sp.set_defaults(func=cmd_dynamic)
