"""Does a loop after ``reconstruct`` keep or wreck the reconstructed student, by how it treats the ranges?

ResNet-20 (or ResNet-56), torchao PT2E at ``--scheme``, 256 real pool images, seed 0: calibrate,
``reconstruct`` (its defaults, cached), then run ``kd`` from that same student once per variant and
print the top-1 agreement with FP on the calibration images and the top-1 on the real test set.
The variants differ only in the optimiser and in how the quantizers' step sizes are treated.

    python tools/chain_ranges_probe.py --scheme w2a4 --steps 200
    python tools/chain_ranges_probe.py --variants adam1e-4-learned,adam1e-4-frozen

Results: docs/claims.md (DiffDFQ at 2 bits, "Diagnosed").
"""
from __future__ import annotations

import argparse
import copy
import time

from dfq_plugins import api, plugins
from dfq_plugins.distillers.chain_guard import ChainGuard
from dfq_plugins.scheme import QuantScheme

ADAM = {"optimizer": "adam", "weight_decay": 0.0}
VARIANTS = {
    "sgd1e-3": {"inherited_ranges": "retrain"},  # kd's own defaults: SGD 1e-3, frozen ranges
    "sgd1e-5": {"lr": 1e-5, "inherited_ranges": "retrain"},
    "adam1e-5-frozen": {**ADAM, "lr": 1e-5, "inherited_ranges": "retrain"},
    "adam1e-4-learned": {**ADAM, "lr": 1e-4, "ranges": "learned", "inherited_ranges": "retrain"},
    "adam1e-4-frozen": {**ADAM, "lr": 1e-4, "ranges": "frozen", "inherited_ranges": "retrain"},
    "adam1e-4-relative": {**ADAM, "lr": 1e-4, "ranges": "learned", "range_lr_mode": "relative",
                          "inherited_ranges": "retrain"},
    "adam1e-4-relative10": {**ADAM, "lr": 1e-4, "ranges": "learned", "range_lr_mode": "relative",
                            "range_lr_scale": 10.0, "inherited_ranges": "retrain"},
    "adam1e-4-learned-kept": {**ADAM, "lr": 1e-4, "ranges": "learned"},  # the default: inherited_ranges="keep"
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifar10-resnet20")
    ap.add_argument("--scheme", default="w2a4")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    args = ap.parse_args()
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    scheme = QuantScheme.parse(args.scheme)
    model, spec = api.resolve_model(args.model, None)
    entry = plugins.get("models", args.model).obj
    cs = api.synthesize(model, "real", input_spec=spec, num_samples=256, seed=0, progress=False,
                        data=entry.calibration_pool())
    test = entry.test_set()
    chain = api.make_toolchain("torchao-pt2e")
    student = chain.quantize(model, scheme, cs, trainable=True)
    student = api.run_distiller(api.make_distiller("reconstruct"), model, spec, student, cs, chain, scheme,
                                progress=False)
    guard = ChainGuard(model, chain, cs.images)

    def top1(s) -> float:
        with chain.measuring(s):
            return api.evaluate(s, test.images, test.labels)

    print(f"{args.model} {scheme.name} real+reconstruct: agreement {guard.agreement(student):.4f}, "
          f"top-1 {top1(student):.2f}", flush=True)
    for name in args.variants.split(","):
        kd = api.make_distiller({"name": "kd", "steps": args.steps, "checkpoint_every": 0, **VARIANTS[name]})
        t = time.perf_counter()
        out = api.run_distiller(kd, model, spec, copy.deepcopy(student), cs, chain, scheme, cache=False,
                                progress=False)
        losses = kd.last_run.history
        print(f"{name}: agreement {guard.agreement(out):.4f}, top-1 {top1(out):.2f}, "
              f"{time.perf_counter() - t:.0f} s, loss {losses[0]} -> {losses[-1]}", flush=True)


if __name__ == "__main__":
    main()
