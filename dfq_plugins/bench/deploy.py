"""``dfq deploy-bench``: export, reload and run quantized models on real int8 backends.

For each calibration source and toolchain: top-1 in process (the toolchain's model), after
export and reload (the artefact, sidecar checked), and on the int8 backend (PT2E through
``torch.compile``/x86 Inductor; NNCF's IR through the OpenVINO CPU runtime). Then latency at
batch 1 and 32, every runner timed alternately in one run, FP32 eager / FP32 Inductor / int8
Inductor / OpenVINO FP32 / OpenVINO int8, and artefact sizes. The JSON is rewritten after every
row and a rerun skips the rows it holds, so a run split across sessions resumes.
"""
from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import plugins
from ..api import evaluate, make_toolchain, synthesize
from ..deploy import export, load
from ..deploy.artifact import inductor_compiled
from ..deploy.latency import time_alternately
from ..errors import DFQError
from ..io import atomic_write_text
from ..scheme import QuantScheme
from .machine import cpu_summary

SUFFIX = {"torchao-pt2e": ".pt2", "torch-ao-fx": ".pt2", "nncf": ".xml"}


@dataclass
class DeployPlan:
    model: str
    sources: list[str] = field(default_factory=lambda: ["zeroq", "real"])
    toolchains: list[str] = field(default_factory=lambda: ["torchao-pt2e", "nncf"])
    scheme: str = "w8a8"
    images: int = 256
    seed: int = 0
    batch_size: int = 32
    source_configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    test_limit: int | None = None
    rounds: int = 20
    threads: int = 2
    batches: tuple[int, ...] = (1, 32)
    toolchain_configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. {"nncf": {"overflow_fix": ...}}


def _top1(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor) -> float:
    return round(evaluate(fn, images, labels, batch_size=32), 2)


def run_deploy_bench(plan: DeployPlan, json_path: Path, log: Callable[[str], None] = print,
                     progress: bool = True) -> dict[str, Any]:
    torch.set_num_threads(plan.threads)
    entry = plugins.get("models", plan.model).obj
    chains = {t: make_toolchain({"name": t, **plan.toolchain_configs.get(t, {})}) for t in plan.toolchains}
    scheme = QuantScheme.parse(plan.scheme)
    for chain in chains.values():
        chain.check_scheme(scheme)
    state: dict[str, Any] = json.loads(json_path.read_text()) if json_path.exists() else {}
    state.setdefault("rows", [])
    out_dir = json_path.with_name(json_path.stem + "-artefacts")
    out_dir.mkdir(parents=True, exist_ok=True)
    model, spec = entry.load()
    model.eval()
    test = entry.test_set()
    images, labels = test.images[: plan.test_limit], test.labels[: plan.test_limit]
    limited = plan.test_limit is not None and plan.test_limit < len(test.labels)
    setup = {"model": plan.model, "testset": f"{test.name}[:{plan.test_limit}]" if limited else test.name,
             "scheme": plan.scheme, "images": plan.images, "seed": plan.seed, "threads": plan.threads,
             "toolchain_configs": plan.toolchain_configs, "torch": torch.__version__, **cpu_summary()}
    if state.get("setup", setup) != setup:  # rows and artefacts of another setup must not be mixed in
        changed = sorted(k for k in setup if state["setup"].get(k) != setup[k])
        raise DFQError(f"{json_path} holds a deploy-bench run with another {', '.join(changed)}; give a new --json "
                       "(or delete that file and its -artefacts folder to start over)")
    state["setup"] = setup

    def save() -> None:
        atomic_write_text(json_path, json.dumps(state, indent=1) + "\n")

    if "fp_top1" not in state:
        state["fp_top1"] = _top1(model, images, labels)
        save()
    log(f"{plan.model}: FP32 top-1 {state['fp_top1']:.2f}% on {state['setup']['testset']}")
    fp_files = {"pt2": out_dir / "fp32.pt2", "openvino": out_dir / "fp32.xml"}
    for fmt, path in fp_files.items():
        if fmt == "openvino" and "nncf" not in plan.toolchains:
            continue
        if not path.exists():
            export(model, path, format=fmt, input_spec=spec, toolchain="fp32")
    state["fp32_bytes"] = {fmt: _bytes(p) for fmt, p in fp_files.items() if p.exists()}
    pool = entry.calibration_pool() if "real" in plan.sources else None
    done = {(r["source"], r["toolchain"]) for r in state["rows"]}
    for source in plan.sources:
        if all((source, t) in done for t in plan.toolchains):
            log(f"skip {source}: already in {json_path}")
            continue
        config = {"name": source, **entry.source_defaults.get(source, {}), **plan.source_configs.get(source, {})}
        cs = synthesize(model, config, input_spec=spec, num_samples=plan.images, batch_size=plan.batch_size,
                        seed=plan.seed, data=pool if source == "real" else None, progress=progress)
        for tname, chain in chains.items():
            if (source, tname) in done:
                continue
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = chain.quantize(model, scheme, cs)
            row: dict[str, Any] = {"source": source, "toolchain": tname, "scheme": chain.resolve_scheme(scheme).name,
                                   "toolchain_config": plan.toolchain_configs.get(tname, {}),
                                   "calibration_hash": cs.content_hash()[:16],
                                   "synth_seconds": cs.manifest.get("synth_seconds")}
            row["top1_in_process"] = _top1(q, images, labels)
            path = out_dir / f"{source}-{tname}{SUFFIX[tname]}"
            export(q, path, input_spec=spec, record={"model": plan.model, "top1": row["top1_in_process"],
                                                     "testset": state["setup"]["testset"]})
            row.update({"artefact": path.name, "bytes": _bytes(path)})
            deployed = load(path, threads=plan.threads)
            row["top1_reloaded"] = _top1(deployed, images, labels)
            if deployed.module is not None:
                row["top1_inductor"] = _top1(deployed.compiled(), images, labels)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            state["rows"].append(row)
            save()
            log(f"{source:6s} {tname:13s} in process {row['top1_in_process']:.2f}, reloaded "
                f"{row['top1_reloaded']:.2f}" + (f", inductor {row['top1_inductor']:.2f}" if "top1_inductor" in row
                                                 else " (OpenVINO runtime)"))
    if "latency_ms" not in state:
        state["latency_ms"] = measure_latency(plan, model, spec, out_dir, state, log)
        save()
    return state


def _bytes(path: Path) -> int:
    return path.stat().st_size + (path.with_suffix(".bin").stat().st_size if path.suffix == ".xml" else 0)


def measure_latency(plan: DeployPlan, model: torch.nn.Module, spec: Any, out_dir: Path, state: dict[str, Any],
                    log: Callable[[str], None]) -> dict[str, dict[str, float]]:
    """Median ms per runner and batch size, all runners alternating within each round."""
    source = plan.sources[0]
    runners: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"fp32 eager": model}
    runners["fp32 inductor"] = inductor_compiled(model)
    if "torchao-pt2e" in plan.toolchains:
        runners["int8 pt2e inductor"] = load(out_dir / f"{source}-torchao-pt2e.pt2").compiled()
    if "nncf" in plan.toolchains:
        # the CPU plugin's default float precision is bf16 where AMX/AVX512-BF16 exist: time both
        runners["fp32 openvino"] = load(out_dir / "fp32.xml", threads=plan.threads, precision="f32")
        default = load(out_dir / "fp32.xml", threads=plan.threads)
        if default.backend != "openvino f32":
            runners[f"fp32 ir, {default.backend} (runtime default)"] = default
        runners["int8 openvino (nncf)"] = load(out_dir / f"{source}-nncf.xml", threads=plan.threads)
    out: dict[str, dict[str, float]] = {}
    for batch in plan.batches:
        x = torch.randn(batch, *spec.shape)
        ms = time_alternately(runners, x, rounds=plan.rounds)
        out[f"batch{batch}"] = {k: round(v, 3) for k, v in ms.items()}
        log(f"batch {batch}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
    return out


def deploy_report(state: dict[str, Any]) -> str:
    s = state["setup"]
    title = (f"## {s['model']} {s['scheme']}: exported artefacts ({s['testset']}, FP32 {state['fp_top1']:.2f}; "
             f"{s['images']} calibration images, seed {s['seed']}, {s['threads']} threads, torch {s['torch']}, "
             f"CPU {s.get('cpu', 'not recorded')} [{' '.join(s.get('isa', []))}])")
    lines = [title, "",
             "| source | toolchain | scheme | in process | after export + reload | int8 backend | artefact MB |",
             "|---|---|---|---|---|---|---|"]
    for r in state["rows"]:
        backend = (f"{r['top1_inductor']:.2f} (inductor)" if "top1_inductor" in r
                   else f"{r['top1_reloaded']:.2f} (openvino)")
        lines.append(f"| {r['source']} | {r['toolchain']} | {r['scheme']} | {r['top1_in_process']:.2f} | "
                     f"{r['top1_reloaded']:.2f} | {backend} | {r['bytes'] / 1e6:.2f} |")
    fp = state.get("fp32_bytes", {})
    lines += ["", "FP32 artefacts: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in fp.items())]
    lat = state.get("latency_ms")
    if lat:
        names = list(next(iter(lat.values())))
        lines += ["", "| batch | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for b, row in lat.items():
            lines.append(f"| {b.removeprefix('batch')} | " + " | ".join(f"{row[n]:.2f} ms" for n in names) + " |")
        for b, row in lat.items():
            pairs = [("int8 pt2e inductor", "fp32 inductor"), ("int8 openvino (nncf)", "fp32 openvino"),
                     *[("int8 openvino (nncf)", n) for n in row if n.endswith("(runtime default)")]]
            ratios = [f"{a} {row[f] / row[a]:.2f}x vs {f}" for a, f in pairs if a in row and f in row]
            if ratios:
                lines.append(f"- {b}: " + "; ".join(ratios))
    return "\n".join(lines)


__all__ = ["DeployPlan", "deploy_report", "run_deploy_bench"]
