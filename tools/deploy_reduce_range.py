"""Lite0 W8A8 torchao PT2E, real calibration (64 images, seed 0): top-1 in process and on x86 Inductor's int8
kernels, with full-range u8 activations (X86InductorQuantizer's default) and with reduce_range (u8 0..127).
Usage: python tools/deploy_reduce_range.py OUTDIR off on   (measured on an AVX2-only CPU; docs/deploy.md)"""
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(2)
from dfq_plugins import evaluate, plugins, quantize, synthesize
from dfq_plugins.bench.machine import cpu_summary
from dfq_plugins.deploy import export, load

entry = plugins.get("models", "efficientnet-lite0").obj
model, spec = entry.load()
model.eval()
test = entry.test_set()
images, labels = test.images[:1000], test.labels[:1000]
cs = synthesize(model, {"name": "real"}, input_spec=spec, num_samples=64, batch_size=32, seed=0,
                data=entry.calibration_pool(), progress=False)
out = Path(sys.argv[1])
out.mkdir(exist_ok=True)
print(cpu_summary(), flush=True)
for arm in sys.argv[2:]:
    q = quantize(model, toolchain={"name": "torchao-pt2e", "reduce_range": arm == "on"}, source=cs, scheme="w8a8",
                 input_spec=spec, progress=False)
    a = evaluate(q, images, labels, batch_size=32)
    d = load(export(q, out / f"reduce-range-{arm}.pt2", input_spec=spec))
    b = evaluate(d.compiled(), images, labels, batch_size=32)
    print(f"reduce_range={arm}: in process {a:.2f}, x86 inductor int8 {b:.2f}", flush=True)
