"""``dfq scale-bench``: synthesis and distillation throughput at 1, 2, ... processes under torchrun.

Each world size is one ``torchrun --standalone`` launch of ``dfq_plugins.bench.scale_worker``
with one thread per process and a fresh cache, so nothing is reused between sizes. The record
holds the seconds, throughput, the set's content hash (the same at every size, or the
distributed synthesis is broken) and the speedup against the smallest size in the same JSON.
Resumable: a (model, config, world size) already in the JSON is skipped.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..io import atomic_write_text, short_hash


@dataclass
class ScalePlan:
    model: str = "cifar10-resnet20"
    nprocs: list[int] = field(default_factory=lambda: [1, 2])
    source: str = "zeroq"
    images: int = 256
    synthesis_batch_size: int = 32
    iterations: int = 50
    toolchain: str = "torch-ao-fx"
    scheme: str = "w4a4"
    distiller: str = "kd"
    distill_steps: int = 40
    distill_batch: int = 64
    seed: int = 0
    threads: int = 1

    def config(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "nprocs"}


def _key(rec: dict[str, Any]) -> str:
    return short_hash({"config": rec["config"], "world_size": rec["world_size"]})


def launch(plan: ScalePlan, nproc: int, timeout_s: float = 3600) -> dict[str, Any]:
    """One torchrun launch; the worker's rank-0 JSON, or a clear error with the workers' last lines."""
    with tempfile.TemporaryDirectory(prefix="dfq-scale-") as tmp:
        out = Path(tmp) / "out.json"
        env = {**os.environ, "DFQ_CACHE": str(Path(tmp) / "cache"), "OMP_NUM_THREADS": str(plan.threads)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "dfq_plugins.bench.scale_worker", json.dumps(plan.config()), str(out)]
        proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"scale-bench: {nproc} process(es) failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def run_scale_bench(plan: ScalePlan, json_path: Path | None, log: Callable[[str], None] = print,
                    ) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    if json_path is not None and json_path.exists():
        records = json.loads(json_path.read_text())["records"]
    done = {_key(r) for r in records}
    for n in plan.nprocs:
        rec = {"model": plan.model, "config": plan.config(), "world_size": n}
        if _key(rec) in done:
            log(f"skip {plan.model} at {n} process(es): already in {json_path}")
            continue
        log(f"{plan.model}: {n} process(es), {plan.threads} thread(s) each ...")
        rec.update(launch(plan, n))
        records.append(rec)
        log(f"  synthesis {rec['synth_seconds']:.1f}s ({rec['images_per_s']:.2f} images/s), distillation "
            f"{rec['distill_steps_per_s']:.2f} steps/s, set {rec['content_hash'][:12]}")
        if json_path is not None:
            atomic_write_text(json_path, json.dumps({"records": records}, indent=1))
    return records


def scale_report(records: list[dict[str, Any]]) -> str:
    """Markdown: one row per (model, config, world size), speedups against the smallest world size."""
    lines = [("| model | source | images x iterations | procs x threads | synthesis s | images/s | speedup | "
              "same set as smallest | distill steps | steps/s | speedup |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(json.dumps([r["model"], r["config"]], sort_keys=True), []).append(r)
    for rows in groups.values():
        rows.sort(key=lambda r: r["world_size"])
        base = rows[0]
        for r in rows:
            c = r["config"]
            lines.append(
                f"| {r['model']} | {c['source']} (batch {c['synthesis_batch_size']}) | {c['images']} x "
                f"{c['iterations']} | {r['world_size']} x {c['threads']} | {r['synth_seconds']:.1f} | "
                f"{r['images_per_s']:.2f} | {r['images_per_s'] / base['images_per_s']:.2f}x | "
                f"{'yes' if r['content_hash'] == base['content_hash'] else 'NO'} | {c['distiller']} "
                f"{c['distill_steps']} x {c['distill_batch']} | {r['distill_steps_per_s']:.2f} | "
                f"{r['distill_steps_per_s'] / base['distill_steps_per_s']:.2f}x |")
    return "\n".join(lines)


__all__ = ["ScalePlan", "launch", "run_scale_bench", "scale_report"]
