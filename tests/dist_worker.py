"""What the distributed tests launch under torchrun (one copy per rank), on the tiny test model.

    python -m torch.distributed.run --nproc-per-node N tests/dist_worker.py synth OUT.json [--source S]
    ... dist_worker.py distill OUT.json [--distill kd] [--steps K]

Rank 0 writes OUT.json with what the test compares (content hash, weights hash, world size).
``DFQ_TEST_DIE_AFTER_BATCHES=k`` makes rank 1 exit hard after writing k batches, as a crash would;
``DFQ_TEST_DIE_AT_STEP=k`` makes it exit at distillation step k.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)

import dfq_plugins
from dfq_plugins import distributed
from dfq_plugins.io import tensors_hash
from tests.conftest import TINY_SPEC, make_tiny


def _die_after(batches: int) -> None:
    """Rank 1 dies (os._exit, no clean-up) once it has written ``batches`` batch files."""
    from dfq_plugins.synthesizers import base

    done = []
    original = base._write_batch

    def write_then_maybe_die(path, images):
        original(path, images)
        done.append(path)
        if len(done) >= batches and distributed.current().rank == 1:
            os._exit(17)

    base._write_batch = write_then_maybe_die


def _die_at_step(step: int) -> None:
    """Rank 1 dies (os._exit) when the distillation reaches ``step``."""
    from dfq_plugins.distillers.loop import TrainingRun

    original = TrainingRun.update

    def update_or_die(self, name, loss):
        if self.step >= step and self.world.rank == 1:
            os._exit(17)
        original(self, name, loss)

    TrainingRun.update = update_or_die


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["synth", "distill"])
    p.add_argument("out")
    p.add_argument("--source", default="zeroq")
    p.add_argument("--distill", default="kd")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--images", type=int, default=32)
    args = p.parse_args()
    if os.environ.get("DFQ_TEST_DIE_AFTER_BATCHES"):
        _die_after(int(os.environ["DFQ_TEST_DIE_AFTER_BATCHES"]))
    if os.environ.get("DFQ_TEST_DIE_AT_STEP"):
        _die_at_step(int(os.environ["DFQ_TEST_DIE_AT_STEP"]))
    source = json.loads(args.source) if args.source.startswith("{") else args.source
    model = make_tiny()
    out: dict = {}
    if args.what == "synth":
        cs = dfq_plugins.synthesize(model, source, input_spec=TINY_SPEC, num_samples=args.images, progress=False)
        out = {"content_hash": cs.content_hash(), "num_samples": cs.num_samples}
    else:
        cs = dfq_plugins.synthesize(model, "noise", input_spec=TINY_SPEC, num_samples=args.images, progress=False)
        student = dfq_plugins.quantize(model, source=cs, scheme="w4a4", input_spec=TINY_SPEC, trainable=True,
                                       progress=False)
        distiller = json.loads(args.distill) if args.distill.startswith("{") else {"name": args.distill}
        distiller = {"batch_size": 8, "checkpoint_every": 2, **distiller}
        if args.steps > 0:  # --steps 0: the calibrated student before any distillation
            dfq_plugins.distill(model, student, cs, distiller=distiller, scheme="w4a4", input_spec=TINY_SPEC,
                                steps=args.steps, progress=False)
        weights = {k: v.detach().float() for k, v in student.state_dict().items() if torch.is_tensor(v)}
        out = {"weights": {k: v.flatten().tolist() for k, v in weights.items()}, "hash": tensors_hash(weights)}
    world = distributed.current()
    out["world_size"] = world.size
    if world.is_main:
        Path(args.out).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
