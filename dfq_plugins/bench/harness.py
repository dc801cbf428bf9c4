"""``dfq bench``: real vs noise vs synthetic calibration, same process, same pipeline.

Records are appended to the JSON file atomically after every run, and a rerun skips the
runs already recorded, so a long benchmark can be split across sessions.
"""
from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import plugins
from ..api import evaluate, make_synthesizer, make_toolchain, synthesize
from ..io import atomic_write_text, short_hash
from ..scheme import QuantScheme

RECORD_FIELDS = ("model", "testset", "toolchain", "scheme", "source", "distill", "images", "steps", "seed",
                 "top1", "fp_top1", "synth_seconds", "total_seconds", "peak_rss_mb")
DISTILL_FIELDS = ("distill_steps", "distill_seconds", "top1_calibrated")


@dataclass
class BenchPlan:
    model: str
    toolchains: list[str]
    schemes: list[str]
    sources: list[str]
    images: int = 256
    seeds: list[int] = field(default_factory=lambda: [0])
    batch_size: int = 32
    source_configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    toolchain_configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    test_limit: int | None = None
    difficulty_plots: list[str] = field(default_factory=lambda: ["dynadfq"])  # sources plotted against real
    distills: list[str | None] = field(default_factory=lambda: [None])  # None: calibration only
    distill_configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    distill_steps: int | None = None  # overrides every distiller's steps (one budget for all rows)
    pairs: list[tuple[str, str | None]] | None = None  # explicit (source, distill) rows instead of the product
    distill_seeds: dict[str, list[int]] = field(default_factory=dict)  # "source+distill" -> seeds for that row
    device: str | None = None  # where every row computes (None: the CPU, where models load); not in run keys

    def rows(self) -> list[tuple[str, str | None]]:
        if self.pairs is not None:
            return list(self.pairs)
        return [(s, d) for s in self.sources for d in self.distills]

    def seeds_of(self, source: str, distill: str | None) -> list[int]:
        return self.distill_seeds.get(row_name(source, distill), self.seeds)


# reconstruct's outcome as a record shows it (not the per-block history)
RECONSTRUCT_SUMMARY = ("returned", "refused", "bn_mismatch", "blocks", "blocks_kept", "held_images",
                       "held_output_mse_before", "held_output_mse_after", "start_bias_corrected", "steps_trained")


def row_name(source: str, distill: str | None) -> str:
    return source if distill is None else f"{source}+{distill}"


def parse_pairs(items: list[str]) -> list[tuple[str, str | None]]:
    """``["real+kd", "noise+adadfq", "zeroq"]`` -> [("real", "kd"), ("noise", "adadfq"), ("zeroq", None)]."""
    out = []
    for item in items:
        source, _, distill = item.partition("+")
        if not source.strip():
            raise ValueError(f"a row is SOURCE or SOURCE+DISTILLER (e.g. real+kd), got {item!r}")
        out.append((source.strip(), distill.strip() or None))
    return out


def chain_config(distillers: list[Any]) -> dict[str, Any]:
    """A row's distiller config: one distiller's own (as records always had), or every stage's."""
    if len(distillers) == 1:
        return distillers[0].config_dict()
    return {"stages": [{"name": d.name, **d.config_dict()} for d in distillers]}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _run_key(rec: dict[str, Any]) -> str:
    return short_hash({k: rec.get(k) for k in ("model", "testset", "toolchain", "scheme", "source", "distill",
                                               "images", "seed", "source_config", "toolchain_config")}
                      | ({"distill_config": rec["distill_config"]} if rec.get("distill") else {})
                      | ({"student_ranges": rec["student_ranges"]} if rec.get("student_ranges") else {}))


def load_records(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not a dfq bench JSON file ({exc}); move it away or pick another --json") from exc
    return list(data.get("records", []))


def _steps_of(config: dict[str, Any]) -> int:
    """Optimisation steps per batch (a wrapper such as diffdfq reports its base's)."""
    if "iterations" not in config and isinstance(config.get("base"), dict):
        return _steps_of(config["base"])
    return int(config.get("iterations", 0) or 0)


def write_difficulty_plot(path: Path, model: Any, spec: Any, pool: Any, cs: Any, plan: BenchPlan, source: str,
                          seed: int) -> None:
    """The synthetic set's per-sample difficulty beside the real pool's (teacher entropy)."""
    from ..synthesizers.base import teacher_soft_labels
    from ..teacher import borrowed_teacher
    from .plots import difficulty_histogram

    with borrowed_teacher(model, spec) as teacher:
        p = teacher_soft_labels(teacher, pool.images.float())
    real = -(p.clamp_min(1e-12).log() * p).sum(1)
    sets = {f"real pool ({pool.name})": real, f"{source} seed {seed}": cs.metadata["difficulty"]}
    if "asked_hard" in cs.metadata:
        hard = cs.metadata["asked_hard"].bool()
        if hard.any() and (~hard).any():
            sets[f"{source}: asked hard"] = cs.metadata["difficulty"][hard]
            sets[f"{source}: asked easy"] = cs.metadata["difficulty"][~hard]
    difficulty_histogram(path, sets, f"{plan.model}: per-sample difficulty, {source} ({plan.images} images) "
                                     f"vs real")


def run_bench(plan: BenchPlan, json_path: Path | None = None,
              log: Callable[[str], None] = print, progress: bool = True) -> list[dict[str, Any]]:
    """Run every (toolchain, scheme, source, seed) of the plan; return all records."""
    entry = plugins.get("models", plan.model).obj
    if entry.test_set is None:
        raise ValueError(f"model {plan.model!r} registers no real test set, so it cannot be benchmarked")
    schemes = [QuantScheme.parse(s) for s in plan.schemes]
    chains = {t: make_toolchain({"name": t, **plan.toolchain_configs.get(t, {})}) for t in plan.toolchains}
    for chain in chains.values():  # refuse impossible combinations before any work
        for s in schemes:
            chain.check_scheme(s)
            for trainable in {d is not None for _, d in plan.rows()}:
                chain.check_bias_correction(chain.resolve_scheme(s, trainable), trainable)
    from .. import distributed
    from ..device import resolve_device

    model, spec = entry.load()
    device = resolve_device(plan.device, model)
    world = distributed.init_from_env(device)
    model.to(device)
    test = entry.test_set()
    images, labels = test.images, test.labels
    if plan.test_limit:
        images, labels = images[: plan.test_limit], labels[: plan.test_limit]
    row_sources = [src for src, _ in plan.rows()]
    plotted = [src for src in plan.difficulty_plots if src in row_sources] if json_path is not None else []
    wants_pool = "real" in row_sources or bool(plotted)
    pool = entry.calibration_pool() if wants_pool and entry.calibration_pool else None
    if "real" in row_sources and pool is None:
        raise ValueError(f"model {plan.model!r} has no real calibration pool for source 'real'")

    records = load_records(json_path)
    done = {_run_key(r) for r in records}
    t0 = time.perf_counter()
    fp_top1 = evaluate(model, images, labels)
    log(f"{plan.model}: full precision top-1 {fp_top1:.2f}% on {test.name} ({len(labels)} images, "
        f"{time.perf_counter() - t0:.1f}s)")

    from ..api import make_distillers, run_distillers

    distillers = {d: make_distillers(d, plan.distill_steps, plan.distill_configs)
                  for d in {d for _, d in plan.rows() if d is not None}}
    seeds = list(dict.fromkeys(x for src, d in plan.rows() for x in plan.seeds_of(src, d)))
    for seed in seeds:
        for source in dict.fromkeys(src for src, _ in plan.rows()):
            config = dict(plan.source_configs.get(source, {}))
            synth = make_synthesizer({"name": source, **config}, data=pool)
            pending = []
            for distill in [d for src, d in plan.rows() if src == source and seed in plan.seeds_of(src, d)]:
                for tname in plan.toolchains:
                    for scheme in schemes:
                        ran = chains[tname].resolve_scheme(scheme, trainable=distill is not None)
                        rec = {"model": plan.model, "testset": test.name if not plan.test_limit else
                               f"{test.name}[:{plan.test_limit}]", "toolchain": tname, "scheme": ran.name,
                               "protocol": ran.protocol,
                               "source": source, "distill": distill, "images": plan.images, "seed": seed,
                               "source_config": synth.config_dict(), "toolchain_config":
                               plan.toolchain_configs.get(tname, {})}
                        if distill is not None:
                            rec["distill_config"] = chain_config(distillers[distill])
                            start = chains[tname].student_ranges(scheme)
                            if start != "observer":  # absent from earlier records: their keys stay valid
                                rec["student_ranges"] = start
                        if _run_key(rec) not in done:
                            pending.append((tname, scheme, distill, rec))
            plot_path = (json_path.with_name(f"{json_path.stem}-difficulty-{source}-seed{seed}.png")
                         if source in plotted and pool is not None else None)
            if not pending and (plot_path is None or plot_path.exists()):
                log(f"skip {source} seed {seed}: already in {json_path}")
                continue
            t_syn = time.perf_counter()
            cs = synthesize(model, {"name": source, **config}, input_spec=spec, num_samples=plan.images,
                            batch_size=plan.batch_size, seed=seed, data=pool, progress=progress)
            if plot_path is not None and world.is_main:
                write_difficulty_plot(plot_path, model, spec, pool, cs, plan, source, seed)
                log(f"wrote {plot_path}")
            synth_seconds = float(cs.manifest.get("synth_seconds", time.perf_counter() - t_syn))
            for tname, scheme, distill, rec in pending:
                t_run = time.perf_counter()
                if distill is None:
                    q = chains[tname].quantize(model, scheme, cs)
                else:
                    student = chains[tname].quantize(model, scheme, cs, trainable=True)
                    with chains[tname].measuring(student):
                        rec["top1_calibrated"] = round(evaluate(student, images, labels), 2)
                    t_dist = time.perf_counter()
                    student = run_distillers(distillers[distill], model, spec, student, cs, chains[tname], scheme,
                                             seed=seed, progress=progress)
                    runs = [d.last_run for d in distillers[distill]]
                    rec.update({"distill_steps": sum(r.step for r in runs),
                                "distill_seconds": round(sum(r.elapsed for r in runs), 2),
                                "distill_wall_this_process": round(time.perf_counter() - t_dist, 2)})
                    if len(runs) > 1:
                        rec["distill_stages"] = [{"name": d.name, "steps": r.step, "seconds": round(r.elapsed, 2),
                                                  **({"ranges_kept": True} if getattr(r, "keeps_ranges", False) else {})}
                                                 for d, r in zip(distillers[distill], runs)]
                    guards = [d.last_guard.to_dict() for d in distillers[distill] if getattr(d, "last_guard", None)]
                    if guards:
                        rec["chain_guard"] = guards
                    summaries = [{k: r.extra[k] for k in RECONSTRUCT_SUMMARY if k in r.extra}
                                 for r in runs if "returned" in r.extra or "block_mse" in r.extra]
                    if summaries:  # what reconstruct's guards did: the held-back check, bn_check
                        rec["reconstruct"] = summaries[0]
                    levels = [lv for r in runs for lv in (r.extra.get("levels") or [])]
                    if levels:
                        rec["diffusion_levels"] = levels
                    q = chains[tname].convert(student)
                top1 = evaluate(q, images, labels)
                rec.update({"steps": _steps_of(synth.config_dict()), "top1": round(top1, 2),
                            "fp_top1": round(fp_top1, 2), "synth_seconds": round(synth_seconds, 2),
                            "total_seconds": round(synth_seconds + time.perf_counter() - t_run, 2),
                            "peak_rss_mb": round(peak_rss_mb(), 1), "calibration_hash": cs.content_hash()[:16],
                            "torch": torch.__version__, "device": str(device), "world_size": world.size})
                records.append(rec)
                done.add(_run_key(rec))
                extra = "" if distill is None else (f", calibrated {rec['top1_calibrated']:.2f}, "
                                                    f"{rec['distill_steps']} steps in {rec['distill_seconds']:.0f}s")
                log(f"{tname:13s} {rec['scheme']:6s} {row_name(source, distill):14s} seed {seed}: top-1 {top1:.2f}% "
                    f"(fp {fp_top1:.2f}, synth {synth_seconds:.1f}s{extra})")
                if json_path is not None and world.is_main:  # under torchrun, rank 0 writes for the group
                    atomic_write_text(json_path, json.dumps({"records": records}, indent=1))
    return records
