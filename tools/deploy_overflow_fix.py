"""Lite0 W8A8 NNCF, real calibration (64 images, seed 0): OpenVINO int8 top-1 with NNCF's overflow fix on the
first layer only (its default) against every layer. Usage: python tools/deploy_overflow_fix.py OUTDIR default enable
Measured on an AVX2-only CPU (docs/deploy.md); the artefacts go to OUTDIR."""
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(2)
from pathlib import Path

from dfq_plugins import evaluate, plugins, quantize, synthesize
from dfq_plugins.deploy import export, load

entry = plugins.get("models", "efficientnet-lite0").obj
model, spec = entry.load(); model.eval()
test = entry.test_set(); images, labels = test.images[:1000], test.labels[:1000]
cs = synthesize(model, {"name": "real"}, input_spec=spec, num_samples=64, batch_size=32, seed=0,
                data=entry.calibration_pool(), progress=False)
out = Path(sys.argv[1]); out.mkdir(exist_ok=True)
for fix in sys.argv[2:]:
    tc = {"name": "nncf"} if fix == "default" else {"name": "nncf", "overflow_fix": fix}
    q = quantize(model, toolchain=tc, source=cs, scheme="w8a8", input_spec=spec, progress=False)
    a = evaluate(q, images, labels, batch_size=32)
    p = export(q, out / f"{fix}.xml", input_spec=spec)
    d = load(p, threads=2)
    b = evaluate(d, images, labels, batch_size=32)
    print(f"overflow_fix={fix}: in process {a:.2f}, openvino ({d.backend}) {b:.2f}", flush=True)
