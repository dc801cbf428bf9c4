"""Whole-set BN statistics (``bn_scope="set"``): every batch of a set optimised together, so the
statistics the BN loss matches are those of the whole set, not of each batch on its own.

This is MCT/DGH's "all images" granularity. Each batch keeps its own canvas, seed, augmentation
and task loss; per step, each BN layer's per-channel sums (images, sum of x, sum of x^2) are
pooled over the batches this rank owns and then all-reduced over ranks, so one pooled mean and
variance per layer drives every batch. Gradients reach each rank's images through its own sums
only (the other ranks' sums enter as constants), which is exact: the pooled statistics are a
sum of per-rank terms. The BN term is scaled by the number of batches so that each image feels
the same pull as under per-batch statistics, and the task losses keep their per-batch weight.

The result does not depend on the world size beyond float rounding (sums are added in another
order), but it is not bitwise equal across world sizes, and it resumes only from the finished
set: batches that move together cannot be resumed one at a time.
"""
from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch

from .. import distributed
from ..teacher import Teacher
from .augment import SynthesisAugment
from .base import seeded_generator
from .bn_stats import BNStatsLoss, BNStatsRecorder, LayerStats, running_targets
from .canvas import Canvas
from .labels import Targets


class JointSynthesis(Protocol):
    """What the whole-set loop reads from its synthesizer (an ``OptimizingSynthesizer``)."""

    iterations: int
    bn_weight: float
    statistic: str
    wants_features: bool
    clip: bool
    bn_loss: BNStatsLoss
    augment: SynthesisAugment

    def make_canvas(self, teacher: Teacher, n: int, g: torch.Generator) -> Canvas: ...
    def task_loss(self, logits: torch.Tensor, features: torch.Tensor | None,
                  targets: Targets | None) -> dict[str, torch.Tensor]: ...


def pooled_stats(local: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], statistic: str, eps: float,
                 world: distributed.World) -> list[LayerStats]:
    """Per layer, the mean and spread of all ranks' images from this rank's (count, sum, sum of
    squares); differentiable in this rank's sums."""
    out = []
    for count, s1, s2 in local:
        n = distributed.all_reduce_sum(count, world)
        g1 = s1 + (distributed.all_reduce_sum(s1.detach(), world) - s1.detach())
        g2 = s2 + (distributed.all_reduce_sum(s2.detach(), world) - s2.detach())
        mean = g1 / n
        var = (g2 / n - mean.pow(2)).clamp_min(0)
        out.append(LayerStats(mean, torch.sqrt(var + eps) if statistic == "std" else var))
    return out


def _layer_sums(stats: list[LayerStats], n: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(count, sum, sum of squares) per layer from one batch's mean and biased variance."""
    return [(torch.tensor(float(n), device=s.mean.device), n * s.mean, n * (s.spread + s.mean.pow(2)))
            for s in stats]


def _add(total: list | None, part: list) -> list:
    if total is None:
        return part
    return [tuple(a + b for a, b in zip(t, p)) for t, p in zip(total, part)]


def optimize_jointly(synth: JointSynthesis, teacher: Teacher, sizes: list[int], seed: int, bar: Any,
                     targets_of: Any) -> dict[int, torch.Tensor]:
    """This rank's batches (index -> images on the CPU), optimised against whole-set statistics."""
    world = distributed.current()
    if len(sizes) < world.size:
        raise distributed.DistributedError(
            f"bn_scope='set' over {world.size} ranks needs at least one synthesis batch per rank, and the set has "
            f"{len(sizes)}; lower synthesis_batch_size or run fewer processes")
    own = [i for i in range(len(sizes)) if world.owns(i)]
    gens = {i: seeded_generator(seed, salt=i + 1) for i in own}
    targets: dict[int, Targets | None] = {}
    for i in own:
        t = targets_of(i, sizes[i])
        targets[i] = None if t is None else t.to(teacher.device)
    canvases = {i: synth.make_canvas(teacher, sizes[i], gens[i]) for i in own}
    bn_modules = [m for _, m in teacher.bn_layers()]
    recorder = BNStatsRecorder(bn_modules, "var")
    goal = running_targets(bn_modules, synth.statistic)
    weights = synth.bn_loss.layer_weights(len(goal), teacher.device)
    features: list[torch.Tensor] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(recorder.record())
        if synth.wants_features:
            stack.enter_context(teacher.penultimate_features(features))
        for step in range(synth.iterations):
            sums = None
            task: dict[int, torch.Tensor] = {}
            for i in own:
                canvases[i].zero_grad()
                recorder.clear()
                features.clear()
                view = synth.augment(canvases[i].render(), gens[i])
                logits = teacher(view)
                sums = _add(sums, _layer_sums(recorder.stats, view.shape[0]))
                terms = synth.task_loss(logits, features[0] if features else None, targets[i])
                task[i] = sum(terms.values()) if terms else logits.new_zeros(())
            bn = synth.bn_weight * synth.bn_loss(pooled_stats(sums, synth.statistic, recorder.eps, world), goal,
                                                 weights)
            (len(sizes) * bn + sum(task.values())).backward()
            for i in own:
                canvases[i].step((len(sizes) * bn + task[i]).detach())
            bar.update(len(own))
            if step % 10 == 0:
                bar.set_postfix(bn=f"{float(bn.detach()):.4f}", lr=f"{canvases[own[0]].lr():.3g}")
    out = {}
    with torch.no_grad():
        for i in own:
            final = synth.augment.finalize(canvases[i].result())
            out[i] = (teacher.spec.clip(final) if synth.clip else final).cpu()
    return out


__all__ = ["optimize_jointly", "pooled_stats"]
