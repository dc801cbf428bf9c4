"""The one training loop every distiller runs in: teacher frozen, student = a toolchain's trainable model.

What it owns, so distillers do not repeat it:

- the student's mode (the GDFQ family fine-tunes with BN on running statistics) and its
  optimiser (SGD with Nesterov momentum by default), the generator's (Adam), and their LR
  schedules, both pure functions of the step;
- the activation-range window: observers on for the first ``observer_steps`` steps, then
  frozen (``ranges="frozen"``), left on (``"observe"``) or trained (``"learned"``, where the
  toolchain's ranges are parameters, as in NNCF);
- warm-up (no student updates before ``warmup_steps``), a budget in steps and/or wall time;
- per-step seeded randomness (``run.rng(step)``), so a resumed run draws what an uninterrupted
  one would have drawn; checkpoints every ``checkpoint_every`` steps and on Ctrl-C;
- a progress bar with the live losses, read on the host every ``LOG_EVERY`` steps only: on a GPU the
  losses, their running means and the non-finite check stay on the device in between, so the
  host never waits for the stream in the steady state (on the CPU a read is free, and a
  non-finite loss is still caught before its update).

Evaluation is not here: the caller evaluates the last step on the real test set, once.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..errors import NonFiniteError
from ..progress import log, progress_bar
from ..quant.learnable import clamp_scales, clampable_scales, learned_range_parameters, range_param_groups
from ..teacher import Teacher
from .checkpoint import load_checkpoint, save_checkpoint

RANGE_MODES = ("frozen", "observe", "learned")
LR_SCHEDULES = ("cosine", "multistep", "constant")
LOG_EVERY = 10  # steps between host reads of the losses (history, progress bar, a GPU's non-finite check)
LossValue = torch.Tensor | float  # what a train_step reports per loss: a detached 0-dim tensor, or a float


class LossMeter:
    """Running means of the step losses (0.9/0.1), kept where the losses are, in float64 as Python
    floats are (so a CPU history is the one ``.item()`` per loss gave), and read in one transfer."""

    def __init__(self) -> None:
        self.running: dict[str, LossValue] = {}

    def add(self, losses: dict[str, LossValue]) -> None:
        for k, v in losses.items():
            v = v.detach().reshape(()).to(torch.float64) if isinstance(v, torch.Tensor) else float(v)
            self.running[k] = v if k not in self.running else 0.9 * self.running[k] + 0.1 * v

    def read(self) -> dict[str, float]:
        """The running means as floats: one device-to-host copy for all of them."""
        keys = [k for k, v in self.running.items() if isinstance(v, torch.Tensor)]
        out = {k: v for k, v in self.running.items() if not isinstance(v, torch.Tensor)}
        if keys:
            values = torch.stack([self.running[k] for k in keys]).tolist()  # type: ignore[misc]
            out.update(zip(keys, values))
        return {k: out[k] for k in self.running}


def lr_factor(schedule: str, step: int, total: int, milestones: tuple[float, ...], gamma: float) -> float:
    """LR multiplier at ``step`` of ``total``; milestones are fractions of the budget."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
    return gamma ** sum(step >= m * total for m in milestones)


@dataclass
class Trainable:
    """A module trained by the loop, with its optimiser and base learning rates."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    base_lrs: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]

    def set_lr_factor(self, factor: float) -> None:
        for g, lr in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = lr * factor


class TrainingRun:
    """State of one distillation run, handed to the distiller's ``train_step``."""

    def __init__(self, distiller: Any, teacher: Teacher, student: nn.Module, toolchain: Any,
                 source: Any, seed: int, workdir: Path | None, key: str, progress: bool) -> None:
        self.d = distiller
        self.teacher = teacher
        self.student = student
        self.toolchain = toolchain
        self.source = source
        self.seed = seed
        self.workdir = None if workdir is None else Path(workdir)
        self.key = key
        self.progress = progress
        self.device = teacher.device  # where the student and generators compute; draws stay on the CPU
        self.trainables: dict[str, Trainable] = {}
        self.extra: dict[str, Any] = {}  # small JSON state of the distiller (e.g. DiffDFQ's level)
        self.step = 0
        self.elapsed = 0.0
        self.history: list[dict[str, float]] = []
        self._observing = False
        self._pending_interrupt: list[int] = []
        self._learned_ranges: list[torch.Tensor] = []
        # the range handling this run applies: the distiller's, unless the student arrives with ranges an
        # earlier stage learned (reconstruct+kd) and the distiller keeps them (inherited_ranges="keep")
        self.keeps_ranges = (getattr(distiller, "inherited_ranges", "keep") == "keep"
                             and bool(learned_range_parameters(student)))
        self.ranges = "frozen" if self.keeps_ranges else distiller.ranges
        self.observer_steps = 0 if self.keeps_ranges else distiller.observer_steps
        if self.keeps_ranges and (distiller.ranges != "frozen" or distiller.observer_steps):
            log.info("distiller %s: the student's ranges were learned by an earlier stage; they stay as they are "
                     "(ranges=%r and observer_steps=%d not applied; inherited_ranges='retrain' applies them)",
                     distiller.name, distiller.ranges, distiller.observer_steps)
        self.world = distributed.current()
        # off the CPU a non-finite loss is noted on the device (first step per trainable) and read with
        # the losses, every LOG_EVERY steps and before every checkpoint; on the CPU it stops the update
        self.defer_host_reads = torch.device(self.device).type != "cpu"
        self._clampable: list[nn.Module] | None = None  # the learned scales, found once (not every step)
        self._first_nonfinite: dict[str, torch.Tensor] = {}

    # -- set-up -------------------------------------------------------------------------------
    def add_student(self) -> None:
        d = self.d
        ranges_mode = self.ranges
        if ranges_mode not in RANGE_MODES:
            raise ValueError(f"ranges={ranges_mode!r}; choose one of {RANGE_MODES}")
        if ranges_mode == "learned":
            ranges = self.toolchain.make_ranges_learnable(self.student)
            if not ranges:
                raise ValueError(f"ranges='learned' needs trainable quantizer ranges, and {self.toolchain.name} "
                                 "offers none for this student; use ranges='frozen' or 'observe'")
        else:
            ranges = self.toolchain.range_parameters(self.student)
        range_ids = {id(p) for p in ranges}
        self._learned_ranges = list(ranges) if ranges_mode == "learned" else []
        for p in ranges:
            p.requires_grad_(ranges_mode == "learned")
        params = [p for p in self.student.parameters() if p.requires_grad and id(p) not in range_ids]
        if not params:
            raise ValueError("the student has no trainable parameter: prepare it with trainable=True")
        groups = [{"params": params}]
        if ranges_mode == "learned":
            groups += range_param_groups(self.student, ranges, d.lr * d.range_lr_scale,
                                         relative=d.range_lr_mode == "relative")
        if d.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=d.lr, momentum=d.momentum,
                                                         nesterov=d.momentum > 0, weight_decay=d.weight_decay)
        elif d.optimizer == "adam":
            opt = torch.optim.Adam(groups, lr=d.lr, weight_decay=d.weight_decay)
        else:
            raise ValueError(f"optimizer={d.optimizer!r}; choose sgd or adam")
        self.trainables["student"] = Trainable(self.student, opt)

    def add_generator(self, name: str, module: nn.Module, lr: float, betas: tuple[float, float] = (0.5, 0.999)) -> None:
        """A generator trained alongside the student (Adam, GDFQ's betas, the student's schedule),
        initialised on the CPU (the same weights on every device), then moved to the teacher's device."""
        module.to(self.device)
        self.trainables[name] = Trainable(module, torch.optim.Adam(module.parameters(), lr=lr, betas=betas))

    # -- per-step helpers ---------------------------------------------------------------------
    def rng(self, step: int, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step * 7919 + salt)

    def share(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (all of it in one process).

        Every rank draws the whole step's batch from ``rng(step)`` and keeps its contiguous
        share, so the ranks together see exactly the batch one process would, and averaging
        their gradients gives the one-process gradient (losses are means over rows)."""
        if not self.world.distributed:
            return t
        n = t.shape[0]
        if n % self.world.size:
            raise distributed.DistributedError(
                f"distiller {self.d.name}: a batch of {n} cannot be split evenly over {self.world.size} processes; "
                f"set batch_size to a multiple of {self.world.size}")
        per = n // self.world.size
        return t[self.world.rank * per:(self.world.rank + 1) * per]

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x)

    @property
    def updating_student(self) -> bool:
        return self.step >= self.d.warmup_steps

    def update(self, name: str, loss: torch.Tensor) -> None:
        """Backward into ``name``'s parameters only, then step its optimiser."""
        t = self.trainables[name]
        if self.defer_host_reads:
            self._note_nonfinite(name, loss)
        elif not torch.isfinite(loss.detach()).all():
            raise NonFiniteError(f"distiller {self.d.name}: the {name} loss is {loss.item()} at step {self.step}; "
                                 "no update was made and the last checkpoint is intact. Lower the learning rate, "
                                 "or check the calibration set and the model for NaN")
        params = [p for g in t.optimizer.param_groups for p in g["params"] if p.requires_grad]
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=params)
        distributed.average_gradients(params, self.world)
        t.optimizer.step()
        if name == "student" and self.ranges == "learned":
            if self._clampable is None:
                self._clampable = clampable_scales(self.student)
            clamp_scales(self.student, self._clampable)

    def _note_nonfinite(self, name: str, loss: torch.Tensor) -> None:
        """Record on the device the first step whose ``name`` loss is NaN or infinite (no host sync)."""
        bad = ~torch.isfinite(loss.detach()).all()
        first = self._first_nonfinite.get(name)
        if first is None:
            first = self._first_nonfinite[name] = torch.full((), -1, dtype=torch.int64, device=loss.device)
        first.copy_(torch.where(bad & (first < 0), torch.full_like(first, self.step), first))

    def check_finite(self) -> None:
        """Raise if a deferred loss went non-finite: the updates since went in, so the student in memory
        is not returned, and no checkpoint is written from it (the last one holds finite steps only)."""
        if not self._first_nonfinite:
            return
        names = list(self._first_nonfinite)
        steps = torch.stack([self._first_nonfinite[n] for n in names]).tolist()
        bad = [(s, n) for n, s in zip(names, steps) if s >= 0]
        if bad:
            step, name = min(bad)
            raise NonFiniteError(f"distiller {self.d.name}: the {name} loss became NaN or infinite at step {step} "
                                 "(checked on the device every few steps); the student is not returned and the last "
                                 "checkpoint is intact. Lower the learning rate, or check the calibration set and "
                                 "the model for NaN")

    def update_student(self, loss: torch.Tensor) -> None:
        """A student step, or nothing during warm-up (only the ranges move then)."""
        if self.updating_student:
            self.update("student", loss)

    @contextlib.contextmanager
    def observers_paused(self) -> Iterator[None]:
        """Forward passes that must not move the ranges (e.g. DiffDFQ's level search)."""
        was = self._observing
        if was:
            self.toolchain.set_observers(self.student, False)
        try:
            yield
        finally:
            if was:
                self.toolchain.set_observers(self.student, True)

    # -- the loop -------------------------------------------------------------------------------
    def _set_observing(self) -> None:
        want = self.step < self.observer_steps or self.ranges == "observe"
        if want != self._observing or self.step == 0:
            self.toolchain.set_observers(self.student, want)
            self._observing = want
            # learned ranges rest while an observer sets them (torchao's switches their gradient off)
            for p in self._learned_ranges:
                p.requires_grad_(not want)

    def _checkpoint_path(self) -> Path | None:
        return None if self.workdir is None else self.workdir / "checkpoint.safetensors"

    def save(self) -> None:
        """Checkpoint; a disk that fails now (full, gone read-only) costs the resume point, never the
        run: a warning, and training goes on (the trained student is returned at the end)."""
        self.check_finite()  # never a checkpoint from a student that took a non-finite update
        path = self._checkpoint_path()
        if path is None or not self.world.is_main:  # rank 0 writes for the group: the ranks hold the same state
            return
        try:
            save_checkpoint(path, key=self.key, step=self.step, elapsed=self.elapsed,
                            modules={k: t.module for k, t in self.trainables.items()},
                            optimizers={k: t.optimizer for k, t in self.trainables.items()},
                            extra={**self.extra, "history": self.history[-200:]})
        except OSError as exc:
            warnings.warn(f"distiller {self.d.name}: could not write the checkpoint at step {self.step} to {path} "
                          f"({type(exc).__name__}: {exc}); training goes on, but cannot resume from here",
                          stacklevel=2)

    def resume(self) -> bool:
        path = self._checkpoint_path()
        found = path is not None and path.exists()
        if not distributed.same_everywhere(int(found), self.world):
            raise distributed.DistributedError(
                f"distiller {self.d.name}: the checkpoint {path} is visible to some processes only; put DFQ_CACHE on "
                "a filesystem every node shares (or delete the checkpoint to restart)")
        if not found:
            return False
        header = load_checkpoint(path, key=self.key, modules={k: t.module for k, t in self.trainables.items()},
                                 optimizers={k: t.optimizer for k, t in self.trainables.items()})
        self.step, self.elapsed = int(header["step"]), float(header["elapsed"])
        extra = dict(header.get("extra", {}))
        self.history = list(extra.pop("history", []))
        self.extra = extra
        self._observing = not (self.step < self.observer_steps or self.ranges == "observe")  # force a set
        log.info("distiller %s: resuming from the checkpoint at step %d of %d (%s)", self.d.name, self.step,
                 self.d.steps, path.parent.name)
        return True

    def run(self, train_step: Callable[[TrainingRun, int], dict[str, LossValue]]) -> None:
        if self.world.distributed and self.d.batch_size % self.world.size:
            raise distributed.DistributedError(
                f"distiller {self.d.name}: batch_size {self.d.batch_size} cannot be split evenly over "
                f"{self.world.size} processes; set it to a multiple of {self.world.size} (it is the global batch)")
        with _deferred_interrupts() as pending:
            self._pending_interrupt = pending
            self._run(train_step)
            if pending:  # the signal came during the last step: the finished run is saved, now stop
                raise KeyboardInterrupt

    def _run(self, train_step: Callable[[TrainingRun, int], dict[str, LossValue]]) -> None:
        d = self.d
        total = d.steps
        bar = progress_bar(total=total, desc=f"distill {d.name}", enabled=self.progress and self.world.is_main,
                           initial=self.step)
        sync_buffers = self.world.distributed and (d.bn_mode == "batch" or self.ranges == "observe" or self.observer_steps)
        started = time.perf_counter() - self.elapsed
        meter = LossMeter()
        try:
            while self.step < total:
                if d.time_budget_s and distributed.agree(time.perf_counter() - started >= d.time_budget_s, self.world):
                    self.extra["stopped_by_time_budget"] = True
                    break
                self._set_observing()
                factor = lr_factor(d.lr_schedule, self.step, total, tuple(d.lr_milestones), d.lr_gamma)
                for t in self.trainables.values():
                    t.set_lr_factor(factor)
                losses = train_step(self, self.step)
                if sync_buffers and (self._observing or d.bn_mode == "batch"):
                    distributed.broadcast_buffers(self.student, self.world)  # ranges/BN stats as rank 0 saw them
                meter.add(losses)
                self.step += 1
                self.elapsed = time.perf_counter() - started
                if self.step % LOG_EVERY == 0 or self.step == total:
                    running = meter.read()
                    self.check_finite()
                    self.history.append({"step": self.step, **{k: round(v, 5) for k, v in running.items()}})
                    bar.set_postfix({k: f"{v:.3g}" for k, v in running.items()}, refresh=False)
                bar.update(1)
                if d.checkpoint_every and self.step % d.checkpoint_every == 0 and self.step < total:
                    self.save()
                if distributed.agree(bool(self._pending_interrupt), self.world) and self.step < total:
                    # Ctrl-C/SIGTERM during the step just done (rank 0's signal stops every rank at the same step)
                    self.save()
                    raise KeyboardInterrupt
        finally:
            bar.close()
        self.extra["steps_done"] = self.step
        self.save()


@contextlib.contextmanager
def _deferred_interrupts() -> Iterator[list[int]]:
    """Ctrl-C and SIGTERM stop the loop at the next step boundary, so the checkpoint written then
    holds completed steps only (a signal landing after the forward pass has already moved the
    observers; one after ``optimizer.step`` has moved the weights). The yielded list receives the
    signals; a second signal stops at once without a checkpoint, and the run then resumes from
    the last periodic one. SIGTERM is handled because background jobs of a non-interactive shell
    ignore SIGINT. Outside the main thread signals cannot be caught; a KeyboardInterrupt raised
    mid-step there (or by code) writes no checkpoint either, for the same reason.
    """
    pending: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return

    def handler(signum: int, _frame: Any) -> None:
        if pending:
            raise KeyboardInterrupt
        pending.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield pending
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


__all__ = ["LOG_EVERY", "LR_SCHEDULES", "RANGE_MODES", "LossMeter", "LossValue", "Trainable", "TrainingRun",
           "lr_factor"]
