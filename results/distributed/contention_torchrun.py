"""The same synthesis under torchrun, one batch per rank, exchanged at the end:
python -m torch.distributed.run --standalone --nproc-per-node 2 results/distributed/contention_torchrun.py"""
import time
import warnings

import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
import dfq_plugins
from dfq_plugins import distributed, plugins

world = distributed.init_from_env("cpu")
model, spec = plugins.get("models", "efficientnet-lite0").obj.load()
src = {"name": "zeroq", "iterations": 30, "synthesis_batch_size": 8}
n = 8 * world.size
dfq_plugins.synthesize(model, {**src, "iterations": 2}, input_spec=spec, num_samples=n, seed=1, progress=False, cache=False)
distributed.barrier(world)
t = time.perf_counter()
dfq_plugins.synthesize(model, src, input_spec=spec, num_samples=n, seed=0, progress=False, cache=False)
t1 = time.perf_counter() - t
distributed.barrier(world)
print(f"rank {world.rank}/{world.size}: own batch done+exchanged {t1:.1f}s = {t1/30:.3f} s/it", flush=True)
