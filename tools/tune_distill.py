"""Quick tuning probe for a distiller on ResNet-20 (first 2,000 CIFAR-10 test images).

    .venv/bin/python tools/tune_distill.py DISTILLER STEPS SOURCE [TOOLCHAIN] [KEY=VALUE ...]
    e.g. .venv/bin/python tools/tune_distill.py kd 300 zeroq torch-ao-fx lr=0.001

Prints top-1 of the calibrated student ("before"), training seconds and top-1 after; seed 0,
256 images, one thread, no checkpoint cache. The numbers in docs/distillation.md came from it.
"""
import sys
import time

import torch

torch.set_num_threads(1)
import dfq_plugins as dq
from dfq_plugins import plugins
from dfq_plugins.api import evaluate, make_toolchain

name = sys.argv[1]; steps = int(sys.argv[2]); src = sys.argv[3] if len(sys.argv) > 3 else "zeroq"
tc = sys.argv[4] if len(sys.argv) > 4 else "torch-ao-fx"
extra = dict(kv.split("=") for kv in sys.argv[5:])
def conv(v):
    try: return int(v)
    except ValueError:
        try: return float(v)
        except ValueError: return v
extra = {k: conv(v) for k, v in extra.items()}
entry = plugins.get("models","cifar10-resnet20").obj
m, spec = entry.load()
test = entry.test_set()
imgs, labels = test.images, test.labels
cs = dq.synthesize("cifar10-resnet20", src, num_samples=256, seed=0, batch_size=32, progress=False,
     data=entry.calibration_pool() if src=="real" else None)
scheme = "w4a4" if tc=="torch-ao-fx" else "w4a4-symact"
st = dq.quantize(m, input_spec=spec, toolchain=tc, source=cs, scheme=scheme, trainable=True, progress=False)
chain = make_toolchain(tc)
with chain.measuring(st):  # observers off: evaluating must not fit the ranges to the test images
    print("before", evaluate(st, imgs, labels))
t=time.time()
st = dq.distill(m, st, cs, input_spec=spec, distiller={"name": name, **extra}, toolchain=tc, scheme=scheme, steps=steps, cache=False, progress=False)
print("train s", time.time()-t)
with chain.measuring(st):
    print("after", evaluate(st, imgs, labels))
