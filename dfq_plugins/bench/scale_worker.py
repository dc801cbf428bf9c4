"""One rank of ``dfq scale-bench`` (run by torchrun): time synthesis, then distillation, on this world size.

    python -m torch.distributed.run --standalone --nproc-per-node N -m dfq_plugins.bench.scale_worker PLAN_JSON OUT

Every phase starts and ends on a barrier, so the seconds are the group's, not one rank's.
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch


def main(plan_json: str, out: str) -> None:
    warnings.filterwarnings("ignore")
    plan = json.loads(plan_json)
    torch.set_num_threads(int(plan["threads"]))
    import dfq_plugins
    from dfq_plugins import distributed, plugins
    from dfq_plugins.bench.machine import cpu_summary

    world = distributed.init_from_env("cpu")
    model, spec = plugins.get("models", plan["model"]).obj.load()
    source = {"name": plan["source"], "iterations": plan["iterations"],
              "synthesis_batch_size": plan["synthesis_batch_size"]}
    distributed.barrier(world)
    t0 = time.perf_counter()
    cs = dfq_plugins.synthesize(model, source, input_spec=spec, num_samples=plan["images"], seed=plan["seed"],
                                progress=False)
    distributed.barrier(world)
    synth_seconds = time.perf_counter() - t0
    student = dfq_plugins.quantize(model, toolchain=plan["toolchain"], source=cs, scheme=plan["scheme"],
                                   input_spec=spec, trainable=True, progress=False)
    distributed.barrier(world)
    t1 = time.perf_counter()
    dfq_plugins.distill(model, student, cs, distiller={"name": plan["distiller"], "batch_size": plan["distill_batch"]},
                        toolchain=plan["toolchain"], scheme=plan["scheme"], input_spec=spec,
                        steps=plan["distill_steps"], seed=plan["seed"], cache=False, progress=False)
    distributed.barrier(world)
    distill_seconds = time.perf_counter() - t1
    if world.is_main:
        Path(out).write_text(json.dumps({
            "synth_seconds": round(synth_seconds, 2), "images_per_s": round(plan["images"] / synth_seconds, 3),
            "content_hash": cs.content_hash(), "distill_seconds": round(distill_seconds, 2),
            "distill_steps_per_s": round(plan["distill_steps"] / distill_seconds, 3),
            "torch": torch.__version__, "backend": world.backend or "none",
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), **cpu_summary()}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
