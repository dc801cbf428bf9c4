"""Per-layer sensitivity: each conv/linear alone with its weights fake-quantized (per-channel,
symmetric MinMax, as the toolchains' default 4-bit weights), everything else in float, on real
images from the model's pool. It answers "where does the model lose its points at 4 bits?".

    .venv/bin/python tools/layer_sensitivity.py --model efficientnet-lite0 --bits 4 --images 64 \
        --json results/lowbit/sensitivity-lite0-w4.json

Writes a JSON record and a Markdown table beside it (layers sorted by the KL divergence of the
logits from the float model's), plus each layer's kind and weights per output channel.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from dfq_plugins import plugins
from dfq_plugins.io import atomic_write
from dfq_plugins.quant.sensitivity import layer_report


def kind_of(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if module.groups > 1 and module.groups == module.in_channels:
        return f"depthwise {module.kernel_size[0]}x{module.kernel_size[1]}"
    return f"conv {module.kernel_size[0]}x{module.kernel_size[1]}"


def sensitivity(model: nn.Module, images: torch.Tensor, bits: int) -> list[dict]:
    modules = dict(model.named_modules())
    rows = layer_report(model, images, bits)
    for row in rows:
        module = modules[row["layer"]]
        row.update(kind=kind_of(module), weights_per_channel=module.weight[0].numel())
    return rows


def markdown(record: dict, top: int = 15) -> str:
    rows = sorted(record["layers"], key=lambda r: -r["kl"])
    lines = [f"# Per-layer sensitivity: {record['model']}, W{record['bits']} weights one layer at a time",
             "", f"{record['images']} real images from {record['pool']}; KL of the logits from the float model's, "
             f"top-1 agreement with it. Command: `{record['command']}`", "",
             "| rank | layer | kind | weights/channel | KL | agreement % | weight rel. error |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows[:top], 1):
        lines.append(f"| {i} | `{r['layer']}` | {r['kind']} | {r['weights_per_channel']} | {r['kl']:.4f} | "
                     f"{r['top1_agreement']:.1f} | {r['weight_error']:.3f} |")
    by_kind: dict[str, list[float]] = {}
    for r in rows:
        by_kind.setdefault(r["kind"].split()[0], []).append(r["kl"])
    lines += ["", "| kind | layers | total KL | mean KL |", "|---|---|---|---|"]
    for kind, kls in sorted(by_kind.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"| {kind} | {len(kls)} | {sum(kls):.4f} | {sum(kls) / len(kls):.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    entry = plugins.get("models", args.model).obj
    model, _ = entry.load()
    pool = entry.calibration_pool()
    started = time.perf_counter()
    layers = sensitivity(model.eval(), pool.images[:args.images].float(), args.bits)
    record = {"model": args.model, "bits": args.bits, "images": args.images, "pool": pool.name, "layers": layers,
              "seconds": round(time.perf_counter() - started, 1), "torch": torch.__version__,
              "command": f"python tools/layer_sensitivity.py --model {args.model} --bits {args.bits} "
                         f"--images {args.images} --json {args.json}"}
    atomic_write(args.json, lambda p: p.write_text(json.dumps(record, indent=1)))
    atomic_write(args.json.with_suffix(".md"), lambda p: p.write_text(markdown(record)))
    print(markdown(record))


if __name__ == "__main__":
    main()
