"""Ad-hoc check (2026-11-23): FX calibration on the cached seed-0 sets, with the input quantizer's
range from the calibration data versus pinned to the InputSpec's valid pixel range. Needs the sets
of recipes/bench-methods-resnet20.toml in the cache and bench-out/methods-resnet20.json
(results/methods/methods-resnet20.json). Run: .venv/bin/python results/methods/input_range_check.py"""
import json, glob, torch
from dfq_plugins.data import CalibrationSet
from dfq_plugins.api import resolve_model, make_toolchain, evaluate
from dfq_plugins.scheme import QuantScheme
from dfq_plugins.toolchain import example_inputs_of
from dfq_plugins import plugins
recs = json.load(open("results/methods/methods-resnet20.json"))["records"]
want = {r["source"]: r["calibration_hash"] for r in recs if r["seed"] == 0 and r["toolchain"] == "torch-ao-fx" and r["scheme"] == "w4a8"}
files = {}
for f in glob.glob("/root/.cache/dfq_plugins/calibration/*.safetensors"):
    cs = CalibrationSet.load(f)
    for s, h in want.items():
        if cs.content_hash()[:16] == h: files[s] = cs
m, spec = resolve_model("cifar10-resnet20", None)
test = plugins.get("models", "cifar10-resnet20").obj.test_set()
lo, hi = spec.bounds()
chain = make_toolchain("torch-ao-fx")
for scheme in ("w4a8", "w4a4"):
    for s in ("genie", "zeroq", "intraq", "noise"):
        cs = files[s]
        out = []
        for anchor in (False, True):
            p = chain.prepare(m, QuantScheme.parse(scheme), example_inputs_of(cs))
            p = chain.calibrate(p, cs)
            if anchor:
                obs = p.activation_post_process_0
                obs.min_val.fill_(float(lo.min())); obs.max_val.fill_(float(hi.max()))
            out.append(evaluate(chain.convert(p), test.images, test.labels))
        print(scheme, s, [round(v, 2) for v in out])
