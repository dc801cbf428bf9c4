"""``dfq synthesize`` and ``dfq quantize``: make a calibration set; calibrate (and fine-tune) a model
through one toolchain."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .. import distributed
from ..errors import DFQError
from .common import add_common_args, add_own_model_args, calibration_data, load_test_set, placed_model, settings


def cmd_synthesize(args: argparse.Namespace) -> int:
    s = settings(args, "synthesize")
    model, spec, entry = placed_model(s)
    t = time.perf_counter()
    cs = calibration_data(s, model, spec, entry, args.quiet)
    print(f"{s['source']}: {cs.num_samples} samples for {s['model']} in {time.perf_counter() - t:.1f}s "
          f"(hash {cs.content_hash()[:16]})")
    if s.get("out") and distributed.current().is_main:
        print(f"saved {cs.save(s['out'])}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..api import evaluate, make_toolchain
    from ..scheme import QuantScheme

    if args.save:
        raise DFQError("--save wrote a pickle (torch.save), which runs code when loaded, and was removed; use "
                       "--export PATH.pt2 (torch-ao-fx below 8 bits, torchao-pt2e) or PATH.xml (nncf, OpenVINO IR): "
                       "a deployable artefact with a JSON sidecar, loaded back by dfq run / dfq_plugins.deploy.load")
    s = settings(args, "quantize")
    scheme = QuantScheme.parse(s["scheme"])
    chain = make_toolchain({"name": s["toolchain"], **s["toolchains"].get(s["toolchain"], {})})
    chain.check_scheme(scheme)
    ran = chain.resolve_scheme(scheme, trainable=bool(s.get("distill")))  # what really runs ('auto' chosen)
    chain.check_bias_correction(ran, trainable=bool(s.get("distill")))
    distillers = None
    if s.get("distill"):  # built (and so checked) before minutes of synthesis
        from ..api import make_distillers

        distillers = make_distillers(s["distill"], int(s["steps"]) if s.get("steps") else None, s["distillers"])
    model, spec, entry = placed_model(s)
    print(f"model {s['model']}: input {spec.shape}, {spec.num_classes} classes")
    test = load_test_set(s, spec, entry)  # read (and so checked) before minutes of synthesis and quantization
    t = time.perf_counter()
    cs = calibration_data(s, model, spec, entry, args.quiet)
    print(f"calibration data: {cs.num_samples} images from '{s['source']}' (seed {s['seed']}) in "
          f"{time.perf_counter() - t:.1f}s (synthesis took {cs.manifest.get('synth_seconds', 0):.1f}s)")
    t = time.perf_counter()
    if distillers is not None:
        from ..api import run_distillers

        student = chain.quantize(model, scheme, cs, trainable=True)
        plan = " then ".join(f"'{d.name}' for {d.steps} steps" + (" per block" if d.name == "reconstruct" else "")
                             for d in distillers)
        print(f"calibrated a trainable {s['toolchain']} student at {ran.name}; fine-tuning it with {plan} "
              "(checkpointed: Ctrl-C and rerun to resume)")
        student = run_distillers(distillers, model, spec, student, cs, chain, scheme, seed=int(s["seed"]),
                                 progress=not args.quiet)
        from ..toolchain import stamp

        q = stamp(chain.convert(student), chain, ran, cs, "+".join(d.name for d in distillers))
    else:
        q = chain.quantize(model, scheme, cs)
    print(f"quantized with {s['toolchain']} at {ran.name} in {time.perf_counter() - t:.1f}s -> "
          f"{type(q).__name__}")
    record: dict[str, Any] = {"model": s["model"]}
    if test is not None:
        fp, acc = evaluate(model, test.images, test.labels), evaluate(q, test.images, test.labels)
        print(f"top-1 on {test.name} ({len(test)} real images): full precision {fp:.2f}%, "
              f"{ran.name} {acc:.2f}% ({acc - fp:+.2f})")
        record.update({"top1": round(acc, 2), "fp_top1": round(fp, 2), "testset": test.name})
    if s.get("export") and distributed.current().is_main:
        from ..deploy import export

        path = export(q, s["export"], input_spec=spec, toolchain=s["toolchain"], record=record)
        if test is not None:  # what the artefact itself scores, run by its runtime (OpenVINO may differ)
            from ..deploy import load
            from ..deploy.sidecar import update_sidecar

            deployed = load(path)
            acc_deployed = evaluate(deployed, test.images, test.labels, batch_size=32)
            update_sidecar(path, {"top1_deployed": round(acc_deployed, 2), "deployed_backend": deployed.backend})
            print(f"top-1 of the exported artefact, reloaded and run by {deployed.backend}: {acc_deployed:.2f}% "
                  f"(in-process {record['top1']:.2f}%)")
            if deployed.backend.startswith("openvino") and acc_deployed < record["top1"] - 0.3:
                print("hint: OpenVINO scores below the fake-quant model. On CPUs without VNNI (AVX2 only) int8 "
                      "kernels saturate unless every layer keeps to 7-bit weights: quantize with the recipe "
                      "table [toolchains.nncf] overflow_fix = \"enable\" (docs/deploy.md)", file=sys.stderr)
        print(f"exported {path} ({path.stat().st_size / 1e6:.2f} MB) with its sidecar {path.name}.json; "
              f"check it with: dfq run {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to ``dfq``'s sub-parsers."""
    sp = sub.add_parser("synthesize", help="make a calibration set and save it")
    add_common_args(sp)
    add_own_model_args(sp)
    sp.add_argument("--source", help="data source (default zeroq), or a set saved by dfq synthesize --out "
                    "(PATH.safetensors)")
    sp.add_argument("--seed", type=int)
    sp.add_argument("--out", help="path of the .safetensors file to write")
    sp.set_defaults(func=cmd_synthesize)

    sp = sub.add_parser("quantize", help="data-free quantization of a model through one toolchain")
    add_common_args(sp)
    add_own_model_args(sp)
    sp.add_argument("--toolchain", help="torch-ao-fx (default), torchao-pt2e or nncf")
    sp.add_argument("--scheme", help="w8a8 (default), w4a8, w4a4, ...; suffixes -protoA, -protoB (input in "
                    "float; B: first layer W8, last W8A8), -wminmax -aminmax (plain MinMax)")
    sp.add_argument("--source", help="data source (default zeroq), or a set saved by dfq synthesize --out "
                    "(PATH.safetensors)")
    sp.add_argument("--seed", type=int)
    sp.add_argument("--export", help="write a deployable artefact: PATH.pt2 (torchao-pt2e; torch-ao-fx below "
                    "8 bits) or PATH.xml (nncf: OpenVINO IR), plus PATH.json (scheme, source, hashes, top-1)")
    sp.add_argument("--save", help=argparse.SUPPRESS)  # removed: it wrote a pickle; says so
    sp.add_argument("--test-dir", dest="test_dir", help="evaluate on your images: one sub-folder per class, "
                    "classes sorted by name = label 0, 1, ...")
    sp.add_argument("--distill", help="fine-tune the calibrated student: kd, adadfq, causal, diffdfq, reconstruct, "
                                      "or a chain run in order, e.g. reconstruct+kd")
    sp.add_argument("--steps", type=int, help="fine-tuning steps (default: the distiller's, 1000)")
    sp.add_argument("--distill-set", dest="distill_set", action="append", metavar="DISTILLER.KEY=VALUE",
                    help="distiller option, e.g. kd.lr=0.001 (repeatable)")
    sp.set_defaults(func=cmd_quantize)
