"""``dfq deploy-bench`` and ``dfq run``: exported int8 artefacts, timed against FP32; load one back and score it."""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import plugins
from ..custom_model import is_custom_model
from ..errors import AssetsMissingError
from ..imagefolder import TRANSFORMS
from ..recipes import split_list
from .common import DEFAULTS


def cmd_deploy_bench(args: argparse.Namespace) -> int:
    from ..bench.deploy import DeployPlan, deploy_report, run_deploy_bench
    from ..io import atomic_write_text

    configs: dict[str, dict[str, object]] = {"nncf": {"overflow_fix": args.overflow_fix}} if args.overflow_fix else {}
    if args.reduce_range:
        configs["torchao-pt2e"] = {"reduce_range": True}
    plan = DeployPlan(model=args.model, sources=split_list(args.source), toolchains=split_list(args.toolchain),
                      toolchain_configs=configs,
                      scheme=args.scheme, images=args.images, seed=args.seed, test_limit=args.test_limit,
                      rounds=args.rounds, threads=args.threads)
    json_path = Path(args.json)
    state = run_deploy_bench(plan, json_path, progress=not args.quiet)
    table = deploy_report(state)
    atomic_write_text(json_path.with_suffix(".md"), table + "\n")
    print(table)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Load an exported artefact (sidecar checked), report top-1 and, with --latency, latency."""
    import torch

    from ..api import evaluate
    from ..deploy import load
    from ..deploy.latency import time_alternately

    torch.set_num_threads(args.threads)
    deployed = load(args.path, threads=args.threads, precision=args.precision)
    info = deployed.info
    print(f"{args.path}: {info['format']} from {info.get('toolchain')} at {info.get('scheme')}, calibrated on "
          f"{info.get('calibration_images')} '{info.get('source')}' images (hash {info.get('calibration_hash')}); "
          f"sha256 verified")
    runner = deployed.compiled() if args.compile else deployed
    spec = deployed.input_spec
    test = None
    if args.test_dir:
        from ..imagefolder import load_image_folder

        test = load_image_folder(args.test_dir, spec, transform=args.image_transform)
        print(f"--test-dir {test.note}")
    else:
        name = args.model or info.get("model")
        entry = plugins.get("models", name).obj if name and not is_custom_model(name) else None
        if entry is None:
            print("no accuracy check: no named model's test set (give one with --model NAME or --test-dir DIR)")
        try:
            test = entry.test_set() if entry is not None and entry.test_set else None
        except AssetsMissingError as exc:
            print(f"no accuracy check: {exc}")
    if test is not None:
        images, labels = test.images[: args.test_limit], test.labels[: args.test_limit]
        acc = evaluate(runner, images, labels, batch_size=32)
        recorded = info.get("top1")
        print(f"top-1 on {test.name} ({len(labels)} images, {runner.backend}): {acc:.2f}%"
              + (f" (recorded at export: {recorded:.2f}%)" if recorded is not None else ""))
    if args.latency:
        for batch in (1, 32):
            x = torch.randn(batch, *spec.shape)
            ms = time_alternately({runner.backend: runner}, x, rounds=args.rounds)[runner.backend]
            print(f"latency at batch {batch}, {args.threads} threads: median {ms:.2f} ms ({args.rounds} runs)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to ``dfq``'s sub-parsers."""
    sp = sub.add_parser("deploy-bench", help="export, reload and time int8 artefacts (PT2E + Inductor, NNCF + "
                        "OpenVINO) against FP32; JSON record and Markdown table")
    sp.add_argument("--model", default=DEFAULTS["model"])
    sp.add_argument("--source", default="zeroq,real", help="comma-separated sources (default zeroq,real)")
    sp.add_argument("--toolchain", default="torchao-pt2e,nncf")
    sp.add_argument("--scheme", default="w8a8")
    sp.add_argument("--images", type=int, default=256)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--test-limit", dest="test_limit", type=int)
    sp.add_argument("--rounds", type=int, default=20, help="timed rounds per batch size")
    sp.add_argument("--overflow-fix", dest="overflow_fix", choices=["enable", "first_layer_only", "disable"],
                    help="NNCF's int8 overflow fix (default: NNCF's, first_layer_only); 'enable' for CPUs without "
                    "VNNI, where the first-layer-only default lost 1.2 points under OpenVINO (Lite0)")
    sp.add_argument("--reduce-range", dest="reduce_range", action="store_true",
                    help="PT2E activations on u8 0..127, for CPUs without VNNI (Lite0 lost 3.8 points on x86 "
                    "Inductor int8 there without it)")
    sp.add_argument("--threads", type=int, default=2)
    sp.add_argument("--json", required=True, help="record (resumed if it exists); .md beside it")
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(func=cmd_deploy_bench)

    sp = sub.add_parser("run", help="load an exported artefact (sidecar checked, no pickle); top-1 and latency")
    sp.add_argument("--precision", choices=["f32", "bf16"], help="OpenVINO float precision (default: the "
                    "runtime's, bf16 on CPUs with AMX or AVX512-BF16; f32 for a true FP32 baseline)")
    sp.add_argument("path", help="the .pt2 or .xml written by dfq quantize --export")
    sp.add_argument("--model", help="evaluate on this model plugin's test set (default: the one it was made for)")
    sp.add_argument("--test-dir", dest="test_dir", help="evaluate on your images: one sub-folder per class")
    sp.add_argument("--image-transform", dest="image_transform", choices=TRANSFORMS, default="auto",
                    help="how --test-dir images reach the input size (see dfq quantize --help)")
    sp.add_argument("--test-limit", dest="test_limit", type=int, help="the first N test images only")
    sp.add_argument("--compile", action="store_true", help="pt2: run through torch.compile (x86 Inductor int8 kernels)")
    sp.add_argument("--latency", action="store_true", help="median latency at batch 1 and 32")
    sp.add_argument("--rounds", type=int, default=20, help="timed runs per batch size (default 20)")
    sp.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    sp.set_defaults(func=cmd_run)
