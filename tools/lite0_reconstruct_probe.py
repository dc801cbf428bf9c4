"""EfficientNet-Lite0 PT2E + ``reconstruct`` on 128 real pool images, scored on val1300[:500].

    .venv/bin/python tools/lite0_reconstruct_probe.py '{"steps": 40, "batch_size": 8}' w4a8

A quick probe (issue 25), not a bench record: prints top-1, seconds and the per-block guard record.
"""
import sys, time, json
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import torch, dfq_plugins
from dfq_plugins import plugins
from dfq_plugins.distillers.reconstruct import ReconstructDistiller
torch.manual_seed(0)
cfg = json.loads(sys.argv[1]); scheme = sys.argv[2] if len(sys.argv) > 2 else "w4a8"
entry = plugins.get("models", "efficientnet-lite0").obj
model, spec = entry.load()
test, pool = entry.test_set(), entry.calibration_pool()
n = 500
t = time.perf_counter()
sums = []
orig = ReconstructDistiller.distill
def distill(self, *a, **k):
    out = orig(self, *a, **k); sums.append(self.last_run.extra); return out
ReconstructDistiller.distill = distill
q = dfq_plugins.quantize(model, toolchain="torchao-pt2e", source="real", scheme=scheme, data=pool, input_spec=spec,
                         num_samples=128, distill={"name": "reconstruct", **cfg}, progress=True)
el = time.perf_counter() - t
acc = dfq_plugins.evaluate(q, test.images[:n], test.labels[:n])
print(json.dumps({"cfg": cfg, "scheme": scheme, "acc": acc, "seconds": el}))
for h in sums[-1]["block_mse"]:
    print(h)
print({k: v for k, v in sums[-1].items() if k != "block_mse"})
