"""``dfq scale-bench``: synthesis and distillation throughput at 1, 2, ... torchrun processes."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import DFQError
from ..recipes import split_list
from .common import DEFAULTS


def cmd_scale_bench(args: argparse.Namespace) -> int:
    from ..bench.scaling import ScalePlan, run_scale_bench, scale_report
    from ..io import atomic_write_text

    nprocs = [int(v) for v in split_list(args.nproc)]
    if not nprocs or min(nprocs) < 1:
        raise DFQError(f"--nproc {args.nproc!r}: give positive process counts, e.g. 1,2")
    plan = ScalePlan(model=args.model, nprocs=nprocs, source=args.source, images=args.images,
                     synthesis_batch_size=args.synthesis_batch, iterations=args.iterations, toolchain=args.toolchain,
                     scheme=args.scheme, distill_steps=args.steps, distill_batch=args.distill_batch, seed=args.seed,
                     threads=args.threads)
    json_path = Path(args.json)
    table = scale_report(run_scale_bench(plan, json_path))
    atomic_write_text(json_path.with_suffix(".md"), table + "\n")
    print(table)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to ``dfq``'s sub-parsers."""
    sp = sub.add_parser("scale-bench", help="synthesis and distillation throughput at 1, 2, ... processes "
                        "(torchrun, gloo); JSON record and Markdown table")
    sp.add_argument("--model", default=DEFAULTS["model"])
    sp.add_argument("--nproc", default="1,2", help="comma-separated world sizes (default 1,2)")
    sp.add_argument("--source", default="zeroq")
    sp.add_argument("--images", type=int, default=256)
    sp.add_argument("--synthesis-batch", dest="synthesis_batch", type=int, default=32,
                    help="images per synthesis batch (batches are what the processes share out)")
    sp.add_argument("--iterations", type=int, default=50)
    sp.add_argument("--toolchain", default="torch-ao-fx")
    sp.add_argument("--scheme", default="w4a4")
    sp.add_argument("--steps", type=int, default=40, help="kd distillation steps timed")
    sp.add_argument("--distill-batch", dest="distill_batch", type=int, default=64, help="global distillation batch")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--threads", type=int, default=1, help="threads per process (default 1)")
    sp.add_argument("--json", required=True, help="record (resumed if it exists); .md beside it")
    sp.set_defaults(func=cmd_scale_bench)
