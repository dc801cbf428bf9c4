"""Synthesis speed against its compute floor: a bare teacher forward+backward on the same batch."""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from ..progress import progress_bar
from ..teacher import Teacher
from .distill_speed import synchronize


def floor_rate(teacher: Teacher, batch: int, iterations: int, channels_last: bool = False) -> float:
    """Images x iterations per second of forward + backward to the input, nothing else."""
    x = torch.randn(batch, *teacher.spec.shape).to(teacher.device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    teacher(x).sum().backward()  # warm-up
    synchronize(teacher.device)
    start = time.perf_counter()
    for _ in range(iterations):
        x.grad = None
        teacher(x).sum().backward()
    synchronize(teacher.device)
    return batch * iterations / (time.perf_counter() - start)


def synth_rate(teacher: Teacher, synth: Any, batch: int, iterations: int) -> float:
    """Images x iterations per second of one synthesis batch (excluding labelling at the end)."""
    synth.iterations = iterations
    synth.synthesis_batch_size = batch
    bar = progress_bar(total=iterations, enabled=False)
    with synth.session(teacher, 0):
        synchronize(teacher.device)
        start = time.perf_counter()
        synth.optimize_batch(teacher, batch, 0, 0, bar)
        synchronize(teacher.device)
        return batch * iterations / (time.perf_counter() - start)


def measure_speed(teacher: Teacher, synth: Any, batch: int = 128, iterations: int = 20,
                  repeats: int = 3) -> dict[str, Any]:
    """Alternate floor and synthesizer runs (so machine load hits both) and report medians."""
    synth_rate(teacher, synth, batch, 2)  # warm-up
    layout = bool(getattr(synth, "uses_channels_last", lambda spec: False)(teacher.spec))
    floors, rates = [], []
    for _ in range(repeats):
        with synth.teacher_layout(teacher):  # the floor runs in the layout the synthesizer uses
            floors.append(floor_rate(teacher, batch, iterations, layout))
        rates.append(synth_rate(teacher, synth, batch, iterations))
    floor, rate = statistics.median(floors), statistics.median(rates)
    return {"method": synth.name, "batch": batch, "iterations": iterations, "repeats": repeats,
            "images_x_iterations_per_s": round(rate, 1), "floor_images_x_iterations_per_s": round(floor, 1),
            "ratio_to_floor": round(floor / rate, 3), "channels_last": layout,
            "teacher_precision": getattr(synth, "teacher_precision", "fp32"), "threads": torch.get_num_threads()}
