"""Lite0 zeroq synthesis speed of one process (1 thread, batch 8, 30 iterations, after a warm-up).
Alone: python results/distributed/contention_single.py alone
Side by side: python ... pair-a & python ... pair-b   (two independent processes sharing the machine)"""
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
import dfq_plugins
from dfq_plugins import plugins

model, spec = plugins.get("models", "efficientnet-lite0").obj.load()
src = {"name": "zeroq", "iterations": 30, "synthesis_batch_size": 8}
dfq_plugins.synthesize(model, {**src, "iterations": 2}, input_spec=spec, num_samples=8, seed=1, progress=False, cache=False)
t = time.perf_counter()
dfq_plugins.synthesize(model, src, input_spec=spec, num_samples=8, seed=0, progress=False, cache=False)
print(sys.argv[1], f"{(time.perf_counter() - t) / 30:.3f} s/it", flush=True)
