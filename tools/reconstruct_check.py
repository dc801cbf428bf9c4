"""Calibration against ``+reconstruct`` on the models issue 25 names, with the guard's summary.

PT2E at the given scheme, 256 images, seed 0, scored on each model's test set. ``user-resnet20``
is the package's ResNet-20 weights in the user-written definition of
``tests/test_written_another_way.py`` (an ``F.pad`` shortcut, ``x.mean`` pooling, ``F.relu``).

    .venv/bin/python tools/reconstruct_check.py --models cifar10-resnet20,user-resnet20,cifar10-resnet56 \
        --sources real,zeroq --json results/lowbit/reconstruct-check.json
    .venv/bin/python tools/reconstruct_check.py --models cifar10-resnet20 --sources real \
        --set holdout=0 --set weight_lr=none          # the defaults before 2026-12-05
    .venv/bin/python tools/reconstruct_check.py --models efficientnet-lite0 --sources real --scheme w4a8 \
        --images 128 --test-limit 500 --set steps=200 --set batch_size=8

Records go to the JSON as they finish, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the user-written definition lives in the tests

import dfq_plugins  # noqa: E402
from dfq_plugins import plugins  # noqa: E402
from dfq_plugins.distillers.reconstruct import ReconstructDistiller  # noqa: E402
from dfq_plugins.io import atomic_write  # noqa: E402


def load(name: str):
    if name == "user-resnet20":
        from tests.test_written_another_way import UserResNet20

        entry = plugins.get("models", "cifar10-resnet20").obj
        package, spec = entry.load()
        model = UserResNet20()
        model.load_state_dict(package.state_dict())
        return model.eval(), spec, entry
    entry = plugins.get("models", name).obj
    model, spec = entry.load()
    return model, spec, entry


def value(text: str):
    return None if text.lower() == "none" else json.loads(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cifar10-resnet20,user-resnet20")
    parser.add_argument("--sources", default="real,zeroq")
    parser.add_argument("--scheme", default="w4a4")
    parser.add_argument("--images", type=int, default=256, help="calibration images")
    parser.add_argument("--test-limit", type=int, default=None, help="score on the first N test images")
    parser.add_argument("--set", action="append", default=[], help="reconstruct option, e.g. holdout=0")
    parser.add_argument("--json", type=Path, default=Path("bench-out/reconstruct-check.json"))
    args = parser.parse_args()
    config = {k: value(v) for k, v in (item.split("=", 1) for item in args.set)}
    records = json.loads(args.json.read_text()) if args.json.exists() else []
    done = {(r["model"], r["source"], r["scheme"], json.dumps(r["config"], sort_keys=True)) for r in records}
    summaries: list[dict] = []
    original = ReconstructDistiller.distill

    def distill(self, *a, **k):
        out = original(self, *a, **k)
        summaries.append(self.last_run.extra)
        return out

    ReconstructDistiller.distill = distill
    for name in args.models.split(","):
        model, spec, entry = load(name)
        test, pool = entry.test_set(), entry.calibration_pool()
        for source in args.sources.split(","):
            if (name, source, args.scheme, json.dumps(config, sort_keys=True)) in done:
                continue
            row = {"model": name, "source": source, "scheme": args.scheme, "config": config, "images": args.images,
                   "seed": 0, "test_set": test.name, "test_limit": args.test_limit}
            for distill_with in (None, {"name": "reconstruct", **config}):
                started = time.perf_counter()
                q = dfq_plugins.quantize(model, toolchain="torchao-pt2e", source=source, scheme=args.scheme,
                                         data=pool if source == "real" else None, input_spec=spec,
                                         num_samples=args.images, distill=distill_with, progress=False)
                key = "calibrated" if distill_with is None else "reconstructed"
                n = args.test_limit or len(test.labels)
                row[key] = round(dfq_plugins.evaluate(q, test.images[:n], test.labels[:n]), 2)
                row[f"{key}_seconds"] = round(time.perf_counter() - started, 1)
            guard = summaries[-1]
            row["guard"] = {k: v for k, v in guard.items() if k != "block_mse"}
            row["rolled_back"] = [h["block"] for h in guard["block_mse"] if not h.get("kept", True)]
            records.append(row)
            atomic_write(args.json, lambda p: p.write_text(json.dumps(records, indent=1)))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
