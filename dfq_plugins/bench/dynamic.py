"""``dfq dynamic``: a dynamic-bit-width model against its fixed-bit variants on real test images.

Builds the variants (cached fine-tuning runs), then for every bit-FLOPs target trains a learned
selector and, for every escalation rate, fits the entropy-threshold cascade; evaluates each on
the real test set with the real routed forward; writes one JSON record, a Markdown table and a
PNG plot of accuracy against average bit-FLOPs.
"""
from __future__ import annotations

import itertools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import losses, plugins
from ..api import evaluate, make_toolchain, synthesize
from ..dynamic import (
    BitSelector,
    CascadeRouter,
    DynamicQuantModel,
    EscalationRouter,
    OutputSelector,
    SelectorConfig,
    SelectorRouter,
    bit_flops,
    choice_fractions,
    entry_for,
    escalation_costs,
    oracle_choices,
    precision_recall,
    stem_of,
    train_selector,
)
from ..dynamic.build import build_variants, scheme_for
from ..dynamic.train import augmented_copies, batched
from ..io import atomic_write_text

GIGA = 1e9
FEATURES = ("image", "stem", "output")  # the selector's input: see dfq_plugins/dynamic/selector.py


@dataclass
class DynamicPlan:
    model: str = "cifar10-resnet20"
    toolchain: str = "torch-ao-fx"
    bits: list[int] = field(default_factory=lambda: [4, 6, 8])
    scheme_template: str = "w{b}a{b}"
    source: str = "dynadfq"
    source_config: dict[str, Any] = field(default_factory=dict)
    images: int = 256
    seed: int = 0  # the variants' fine-tuning set; the selector trains on the set of seed + 1
    batch_size: int = 32
    distill: str = "kd"
    distill_config: dict[str, Any] = field(default_factory=dict)
    steps: dict[int, int] = field(default_factory=dict)
    features: str = "image"
    selector_bits: int = 32  # the selector runs in float: counted at 32 x 32 bits
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    copies: int = 8  # augmented views of each synthetic image the selector trains on
    targets: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.45, 0.6, 0.8])
    escalate: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.5, 0.7])
    references: list[str] = field(default_factory=lambda: ["real", "noise"])  # calibration-only fixed bits
    timing_batch: int = 256
    test_limit: int | None = None

    def __post_init__(self) -> None:
        for name in ("targets", "escalate"):
            bad = [v for v in getattr(self, name) if not 0.0 <= v <= 1.0]
            if bad:
                raise ValueError(f"{name} are fractions between 0 and 1, got {bad}")
        if self.features not in FEATURES:
            raise ValueError(f"features={self.features!r}: choose one of {FEATURES}")
        if self.copies < 1:
            raise ValueError("copies must be at least 1 (the images themselves)")


def line_between(fixed: list[dict[str, Any]], cost: float) -> float | None:
    """Accuracy of the straight line between the two fixed-bit variants around ``cost``."""
    pts = sorted((f["bit_flops"], f["top1"]) for f in fixed)
    for (c0, a0), (c1, a1) in itertools.pairwise(pts):
        if c0 <= cost <= c1:
            return a0 + (a1 - a0) * (cost - c0) / (c1 - c0)
    return None


def _routed(dyn: DynamicQuantModel, images: torch.Tensor, batch_size: int = 250) -> tuple[torch.Tensor, ...]:
    logits, choices, cost = [], [], []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            logits.append(dyn(images[i:i + batch_size]))
            r = dyn.last_routing
            choices.append(r.choices)
            cost.append(r.cost)
    return torch.cat(logits), torch.cat(choices), torch.cat(cost)


def _median_seconds(fn: Callable[[], Any], repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_dynamic(plan: DynamicPlan, json_path: Path | None = None, log: Callable[[str], None] = print,
                progress: bool = True) -> dict[str, Any]:
    entry = plugins.get("models", plan.model).obj
    if entry.test_set is None:
        raise ValueError(f"model {plan.model!r} registers no real test set, so it cannot be benchmarked")
    chain = make_toolchain(plan.toolchain)
    for b in plan.bits:
        chain.check_scheme(scheme_for(b, plan.scheme_template))
    model, spec = entry.load()
    test = entry.test_set()
    images, labels = test.images, test.labels
    if plan.test_limit:
        images, labels = images[: plan.test_limit], labels[: plan.test_limit]
    testset = test.name if not plan.test_limit else f"{test.name}[:{plan.test_limit}]"
    fp_logits = batched(model.eval(), images)
    fp_top1 = 100.0 * float((fp_logits.argmax(1) == labels).float().mean())
    log(f"{plan.model}: full precision top-1 {fp_top1:.2f}% on {testset} ({len(labels)} images)")

    source = {"name": plan.source, **plan.source_config}
    train_set = synthesize(model, source, input_spec=spec, num_samples=plan.images, batch_size=plan.batch_size,
                           seed=plan.seed, progress=progress)
    select_set = synthesize(model, source, input_spec=spec, num_samples=plan.images, batch_size=plan.batch_size,
                            seed=plan.seed + 1, progress=progress)
    distill = {"name": plan.distill, **plan.distill_config}
    variants = build_variants(model, spec, chain, train_set, plan.bits, steps=plan.steps, distill=distill,
                              template=plan.scheme_template, seed=plan.seed, progress=progress)
    deployed = {v.label: v.deployed for v in variants}
    costs = {v.label: v.bit_flops for v in variants}
    fixed = []
    for v in variants:
        top1 = evaluate(v.deployed, images, labels)
        fixed.append({"label": v.label, "bits": v.scheme.weight_bits, "bit_flops": v.bit_flops,
                      "top1": round(top1, 2), "distill_steps": v.distill_steps,
                      "distill_seconds": v.distill_seconds})
        log(f"fixed {v.label}: top-1 {top1:.2f}% at {v.bit_flops / GIGA:.3f} G bit-FLOPs "
            f"({v.distill_steps} {plan.distill} steps)")
    references = []
    pool = entry.calibration_pool() if "real" in plan.references and entry.calibration_pool else None
    for ref in plan.references:
        if ref == "real" and pool is None:
            continue
        cs = synthesize(model, ref, input_spec=spec, num_samples=plan.images, batch_size=plan.batch_size,
                        seed=plan.seed, data=pool, progress=progress)
        for b in plan.bits:
            q = chain.quantize(model, scheme_for(b, plan.scheme_template), cs)
            references.append({"source": ref, "label": scheme_for(b, plan.scheme_template).name,
                               "top1": round(evaluate(q, images, labels), 2)})
    if references:
        log("calibration-only references: " + ", ".join(f"{r['source']} {r['label']} {r['top1']:.2f}"
                                                       for r in references))

    dyn = DynamicQuantModel(deployed, costs, CascadeRouter(float("inf")))
    test_all = dyn.forward_all(images)
    oracle = oracle_choices(test_all, fp_logits.argmax(1))
    k = len(variants)
    oracle_cost = float(dyn.costs[oracle].mean())
    oracle_top1 = 100.0 * float((test_all[oracle, torch.arange(len(labels))].argmax(1) == labels).float().mean())
    log(f"oracle routing: top-1 {oracle_top1:.2f}% at {oracle_cost / GIGA:.3f} G, "
        f"fractions {[round(f, 3) for f in choice_fractions(oracle, k)]}")

    sel_images = augmented_copies(select_set.images.float(), plan.copies, plan.seed + 1)
    sel_logits = dyn.forward_all(sel_images)
    sel_teacher = batched(model, sel_images)
    synthetic = {"fractions_synthetic_selector_set": select_set.images.float(),
                 "fractions_synthetic_variant_set": train_set.images.float()}

    def describe(router: torch.nn.Module) -> dict[str, Any]:
        routed = dyn.with_router(router)
        logits, choices, cost = _routed(routed, images)
        top1 = 100.0 * float((logits.argmax(1) == labels).float().mean())
        avg = float(cost.mean())
        line = line_between(fixed, avg)
        row = {"top1": round(top1, 2), "avg_bit_flops": round(avg), "line_top1": None if line is None else
               round(line, 2), "gain_over_line": None if line is None else round(top1 - line, 2),
               "fractions_real": choice_fractions(choices, k),
               "oracle": precision_recall(choices, oracle, k)}
        for key, x in synthetic.items():
            row[key] = choice_fractions(_routed(routed, x)[1], k)
        return row

    selector_cost = 0
    selector_rows, selectors = [], []
    lo, hi = min(costs.values()), max(costs.values())
    on_output = plan.features == "output"
    for t in plan.targets:
        target = lo + t * (hi - lo)
        # An output selector reads the logits of the entry variant (the dearest the budget affords
        # on every input), which every input then pays for; it chooses among that one and the dearer.
        entry = entry_for(dyn.costs, target) if on_output else 0
        with torch.random.fork_rng():
            torch.manual_seed(plan.seed)
            if on_output:
                selector = OutputSelector(k - entry)
            else:
                selector = BitSelector(spec.shape[0], k, features=plan.features,
                                       stem=stem_of(model) if plan.features == "stem" else None)
        in_shape = (sel_logits.shape[-1],) if on_output else spec.shape
        selector_cost = bit_flops(selector, in_shape, None, bits=(plan.selector_bits, plan.selector_bits))
        if on_output:
            history = train_selector(selector, sel_logits[entry], sel_logits[entry:], sel_teacher,
                                     escalation_costs(dyn.costs, entry)[entry:], target, plan.selector,
                                     seed=plan.seed, progress=progress)
            router = EscalationRouter(selector, selector_cost, entry=entry)
        else:
            history = train_selector(selector, sel_images, sel_logits, sel_teacher, dyn.costs, target,
                                     plan.selector, seed=plan.seed, progress=progress)
            router = SelectorRouter(selector, selector_cost)
        train_fractions = [0.0] * entry + history[-1]["fractions"]
        row = {"target_fraction": t, "target_bit_flops": round(target), "entry": dyn.labels[entry],
               **describe(router), "train_fractions": train_fractions}
        selector_rows.append(row)
        selectors.append(router)
        log(f"selector target {t:.2f}: top-1 {row['top1']:.2f}% at {row['avg_bit_flops'] / GIGA:.3f} G "
            f"(line {row['line_top1']}), real fractions {[round(f, 3) for f in row['fractions_real']]}")

    entropy = losses.entropy(sel_logits[0][: select_set.images.shape[0]])
    cascade_rows = []
    for e in plan.escalate:
        threshold = float(torch.quantile(entropy, 1.0 - e))
        row = {"escalate_fraction": e, "threshold": round(threshold, 5), **describe(CascadeRouter(threshold))}
        cascade_rows.append(row)
        log(f"cascade escalate {e:.2f}: top-1 {row['top1']:.2f}% at {row['avg_bit_flops'] / GIGA:.3f} G "
            f"(line {row['line_top1']})")

    timed: dict[str, torch.nn.Module] = {}
    if selectors:
        timed[f"selector-routed (target {plan.targets[len(selectors) // 2]})"] = selectors[len(selectors) // 2]
    if cascade_rows:
        middle = cascade_rows[len(cascade_rows) // 2]
        timed[f"cascade (escalate {middle['escalate_fraction']})"] = CascadeRouter(middle["threshold"])
    timing = routing_timing(dyn, images[: plan.timing_batch], timed)
    log("routing a batch of {batch}: ".format(**timing) + ", ".join(
        f"{name} {ms:.1f} ms" for name, ms in timing["median_ms"].items()))
    record = {"config": {**{k_: v for k_, v in asdict(plan).items() if k_ != "selector"},
                         "selector": plan.selector.to_dict(), "testset": testset, "torch": torch.__version__,
                         "train_set_hash": train_set.content_hash()[:16],
                         "selector_set_hash": select_set.content_hash()[:16]},
              "fp_top1": round(fp_top1, 2), "fixed": fixed, "references": references,
              "selector_bit_flops": selector_cost, "labels": dyn.labels,
              "oracle": {"top1": round(oracle_top1, 2), "avg_bit_flops": round(oracle_cost),
                         "fractions_real": choice_fractions(oracle, k)},
              "selector": selector_rows, "cascade": cascade_rows, "timing": timing}
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(record, indent=1))
        from .report import dynamic_table
        atomic_write_text(json_path.with_suffix(".md"), dynamic_table(record) + "\n")
        from .plots import dynamic_plot
        dynamic_plot(json_path.with_suffix(".png"), record)
        log(f"wrote {json_path}, {json_path.with_suffix('.md')} and {json_path.with_suffix('.png')}")
    return record


def routing_timing(dyn: DynamicQuantModel, batch: torch.Tensor, routers: dict[str, torch.nn.Module],
                   repeats: int = 5) -> dict[str, Any]:
    """Median wall clock of one batch: each fixed variant alone, then each routed model."""
    out: dict[str, float] = {}
    with torch.no_grad():
        for label, v in zip(dyn.labels, dyn.variants, strict=True):
            out[f"fixed {label}"] = 1000 * _median_seconds(lambda v=v: v(batch), repeats)
        for name, router in routers.items():
            routed = dyn.with_router(router)
            out[name] = 1000 * _median_seconds(lambda routed=routed: routed(batch), repeats)
            if isinstance(router, SelectorRouter):
                out["the selector alone"] = 1000 * _median_seconds(lambda r=router: r.choose(batch), repeats)
            elif isinstance(router, EscalationRouter):
                first = dyn.variants[router.entry](batch)
                out["the selector alone"] = 1000 * _median_seconds(lambda r=router: r.selector(first), repeats)
    return {"batch": int(batch.shape[0]), "median_ms": {n: round(v, 2) for n, v in out.items()},
            "repeats": repeats, "threads": torch.get_num_threads()}
