"""A distiller's training step against its compute floor, on the device it runs on.

The floor is the arithmetic a step cannot avoid at its batch (issue 23): the teacher's forward,
the generator's forward and backward where the distiller trains one, and the student's forward
and backward, with the student's range observers off. Whatever the step spends above it is the
distiller's own overhead: losses, optimiser steps, observers, host syncs, kernel launches. Steps
are timed past warm-up and the observer window, in the steady state a long run spends its time in.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..distillers.loop import TrainingRun
from ..teacher import Teacher


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so a timer reads finished work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steady_run(teacher: Teacher, distiller: Any, student: nn.Module, toolchain: Any, source: Any) -> TrainingRun:
    """The run a distillation would build (student optimiser, generator), without its loop or checkpoints."""
    if not hasattr(distiller, "train_step") or type(distiller).train_step is _base_train_step():
        raise ValueError(f"distiller {distiller.name!r} has no training step to time (reconstruct fits block by "
                         "block); time it with `dfq bench --rows SOURCE+reconstruct`, whose record gives its seconds")
    if distiller.requires_source() and source is None:
        raise ValueError(f"distiller {distiller.name!r} trains on a calibration set; pass one")
    if distiller.bn_mode == "batch":
        toolchain.student_train(student)
    else:
        toolchain.student_eval(student)
    run = TrainingRun(distiller, teacher, student, toolchain, source, 0, None, f"speed-{distiller.name}", False)
    run.add_student()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        distiller.setup(run)
    return run


def _base_train_step() -> Callable[..., Any]:
    from ..distillers.base import Distiller

    return Distiller.train_step


def first_steady_step(distiller: Any) -> int:
    """The first step past warm-up (student updates on) and the observer window."""
    return max(int(getattr(distiller, "warmup_steps", 0)), int(getattr(distiller, "observer_steps", 0)))


def _timed(fn: Callable[[int], Any], steps: int, device: torch.device, start: int = 0) -> float:
    """Seconds per call of ``fn(i)`` over ``steps`` calls, after two untimed ones."""
    fn(start)
    fn(start + 1)
    synchronize(device)
    began = time.perf_counter()
    for i in range(steps):
        fn(start + 2 + i)
    synchronize(device)
    return (time.perf_counter() - began) / steps


def step_seconds(run: TrainingRun, steps: int) -> float:
    """Seconds per steady-state training step of ``run``'s distiller."""
    first = first_steady_step(run.d)

    def one(step: int) -> None:
        run.step = step
        run._set_observing()
        run.d.train_step(run, step)

    return _timed(one, steps, run.device, first)


@contextlib.contextmanager
def _observers_off(run: TrainingRun) -> Iterator[None]:
    run.toolchain.set_observers(run.student, False)
    try:
        yield
    finally:
        run.toolchain.set_observers(run.student, run._observing)  # as the run's steps left them


def _floor_images(run: TrainingRun, step: int) -> torch.Tensor:
    d = run.d
    if "generator" in run.trainables:
        make = getattr(d, "intervened_images", None) or d.generator_images
        return make(run, step)[0]
    return torch.randn(d.batch_size, *run.teacher.spec.shape, generator=run.rng(step)).to(run.device)


def floor_seconds(run: TrainingRun, steps: int) -> dict[str, float]:
    """Seconds per step of the unavoidable passes at the step's batch, each timed alone, and their sum."""
    student = run.student
    params = [p for p in student.parameters() if p.requires_grad]
    x = _floor_images(run, 0).detach()
    parts: dict[str, float] = {}

    def teacher_forward(_i: int) -> None:
        with torch.no_grad():
            run.teacher(x)

    def student_forward_backward(_i: int) -> None:
        out = student(x)
        grads = torch.autograd.grad(out.float().sum(), params, allow_unused=True)
        del grads

    parts["teacher_forward_s"] = _timed(teacher_forward, steps, run.device)
    if "generator" in run.trainables:
        gen_params = [p for p in run.trainables["generator"].module.parameters() if p.requires_grad]

        def generator_forward_backward(i: int) -> None:
            torch.autograd.grad(_floor_images(run, i).float().sum(), gen_params, allow_unused=True)

        parts["generator_forward_backward_s"] = _timed(generator_forward_backward, steps, run.device)
    with _observers_off(run):
        parts["student_forward_backward_s"] = _timed(student_forward_backward, steps, run.device)
    parts["floor_s"] = sum(parts.values())
    return parts


def measure_distiller_speed(teacher: Teacher, distiller: Any, student: nn.Module, toolchain: Any, source: Any,
                            steps: int = 10, repeats: int = 3) -> dict[str, Any]:
    """Median seconds per steady-state step against the median floor, alternated so load hits both."""
    run = steady_run(teacher, distiller, student, toolchain, source)
    step_times, floors = [], []
    precision = getattr(distiller, "teacher_precision", "fp32")
    with teacher.precision(precision):  # the floor's teacher forward at the precision the step uses
        for _ in range(repeats):
            floors.append(floor_seconds(run, steps))
            step_times.append(step_seconds(run, steps))
    step = statistics.median(step_times)
    floor = {k: statistics.median(f[k] for f in floors) for k in floors[0]}
    return {"method": distiller.name, "batch": distiller.batch_size, "steps": steps, "repeats": repeats,
            "device": str(run.device), "ranges": run.ranges, "step_s": round(step, 5),
            **{k: round(v, 5) for k, v in floor.items()}, "ratio_to_floor": round(step / floor["floor_s"], 3),
            "teacher_precision": precision, "threads": torch.get_num_threads()}


__all__ = ["floor_seconds", "measure_distiller_speed", "step_seconds", "steady_run", "synchronize"]
