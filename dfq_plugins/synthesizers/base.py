"""What every synthesizer shares: config as dataclass fields, labelling by the teacher, batch bookkeeping."""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..data import CalibrationSet
from ..teacher import Teacher, check_finite


@dataclass
class Synthesizer:
    """Base class: subclasses are dataclasses whose fields are their configuration.

    ``synthesize`` returns a CalibrationSet whose samples are labelled by the teacher (hard
    label, soft label and prediction entropy as ``difficulty``), which distillers reuse.
    """

    name = "synthesizer"
    needs_batchnorm = False
    version = 1  # bump when a change alters the data a given config and seed produce (part of the cache key)
    cacheable = True  # False for sources whose output depends on data outside the config
    speed_only_fields: ClassVar[tuple[str, ...]] = ()  # knobs that change speed, not the data (kept out of cache keys)
    # Knobs added after data was cached whose default reproduces the earlier behaviour bitwise:
    # left out of the config (and cache key) while at that default, so existing caches stay valid.
    omit_at_default: ClassVar[tuple[str, ...]] = ()

    def config_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if not f.name.startswith("_") and f.name not in self.speed_only_fields
                and not (f.name in self.omit_at_default and getattr(self, f.name) == f.default)}

    def synthesize(self, teacher: Teacher, num_samples: int, *, seed: int = 0, batch_size: int = 32,
                   progress: bool = True, workdir: Path | None = None) -> CalibrationSet:
        raise NotImplementedError

    # -- the optimisation-loop contract (used by synthesis, resume and `dfq speed`) -------------
    has_optimization_loop: ClassVar[bool] = False  # True when optimize_batch is implemented

    def optimize_batch(self, teacher: Teacher, n: int, seed: int, index: int, bar: Any) -> torch.Tensor:
        """Synthesize batch ``index`` of ``n`` images (the hot loop); sources that optimise override it."""
        raise NotImplementedError(f"{self.name} has no per-batch optimisation loop")

    def teacher_layout(self, teacher: Teacher) -> contextlib.AbstractContextManager:
        """Context in which ``optimize_batch`` runs (e.g. a channels-last teacher); none by default."""
        return contextlib.nullcontext()

    def session(self, teacher: Teacher, seed: int) -> contextlib.AbstractContextManager:
        """Everything ``optimize_batch`` needs set up for one run (layout, per-run state, students)."""
        return self.teacher_layout(teacher)

    # -- helpers -------------------------------------------------------------------------------
    def finish(self, teacher: Teacher, images: torch.Tensor, seed: int, batch_size: int,
               labels: torch.Tensor | None = None, extra: dict[str, Any] | None = None,
               metadata: dict[str, torch.Tensor] | None = None) -> CalibrationSet:
        check_finite(f"{self.name}: the synthesized images", images,
                     "the optimisation diverged; lower the learning rate or check the model")
        soft = teacher_soft_labels(teacher, images)
        check_finite(f"{self.name}: the teacher's soft labels of the synthesized images", soft,
                     "the model gives non-finite logits on them")
        entropy = -(soft.clamp_min(1e-12).log() * soft).sum(1)
        from .. import __version__

        manifest = {"method": self.name, "method_version": self.version, "package_version": __version__,
                    "config": self.config_dict(), "seed": seed,
                    "num_samples": int(images.shape[0]), "teacher": teacher.fingerprint(),
                    "input_spec": teacher.spec.to_dict(), **(extra or {})}
        return CalibrationSet(images.contiguous(), batch_size,
                              labels=soft.argmax(1) if labels is None else labels,
                              soft_labels=soft, metadata={"difficulty": entropy, **(metadata or {})},
                              manifest=manifest)


@torch.no_grad()
def teacher_soft_labels(teacher: Teacher, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """The teacher's softmax on ``images``, computed where the teacher is, returned on the CPU."""
    device = teacher.device
    return torch.cat([teacher(images[i:i + chunk].to(device)).softmax(1).cpu()
                      for i in range(0, images.shape[0], chunk)])


@torch.no_grad()
def teacher_features(teacher: Teacher, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """The classifier's input features (pooled penultimate activations) of ``images``."""
    store: list[torch.Tensor] = []
    device = teacher.device
    with teacher.penultimate_features(store):
        for i in range(0, images.shape[0], chunk):
            teacher(images[i:i + chunk].to(device))
    return torch.cat(store).flatten(1).cpu()


def seeded_generator(seed: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + salt)


def batches_of(num_samples: int, batch_size: int) -> list[int]:
    """Sizes of the synthesis batches covering ``num_samples``."""
    full, rest = divmod(num_samples, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def resumable_batches(sizes: list[int], workdir: Path | None, make: Callable[[int, int], torch.Tensor],
                      after: Callable[[int, torch.Tensor, bool], None] | None = None,
                      independent: bool = True) -> list[torch.Tensor]:
    """Run ``make(index, size)`` per batch, keeping finished batches in ``workdir``.

    ``after(index, images, resumed)`` runs on every batch in order, made or resumed, so state
    carried across batches (a class-centre memory) is rebuilt identically on resume.

    Each finished batch is written atomically, so an interrupted run resumes where it stopped
    and never reads half a batch. Under torch.distributed, batch ``i`` is made by rank
    ``i % world_size`` with its own seed and sent to every rank, so the set is the one a single
    process makes; rank 0 also keeps every batch in ``workdir``, so a rerun under any world size
    resumes from them. ``independent=False`` (a batch depends on the ones before it through
    ``after``) makes the ranks take turns in batch order: correct, but no faster.
    """
    from .. import distributed

    world = distributed.current()

    def finished(i: int, size: int) -> tuple[torch.Tensor, bool]:
        path = _batch_path(workdir, i)
        if path is not None and path.exists():
            t = _verified_batch(path, size)
            if t is not None:
                return t, True
            path.unlink(missing_ok=True)  # damaged or unverifiable leftover: redo that batch
        images = make(i, size).detach().contiguous()
        check_finite(f"synthesis batch {i}", images, "the optimisation diverged (nothing of it was cached); "
                     "lower the learning rate or check the model's BatchNorm statistics")
        _write_batch(path, images)
        return images, False

    if not world.distributed:
        out = []
        for i, size in enumerate(sizes):
            images, resumed = finished(i, size)
            out.append(images)
            if after is not None:
                after(i, images, resumed)
        return out

    mine = {i: finished(i, size) for i, size in enumerate(sizes) if world.owns(i)} if independent else {}
    out = []
    for i, size in enumerate(sizes):
        if not independent and world.owns(i):
            mine[i] = finished(i, size)
        images = distributed.broadcast_tensor(mine[i][0] if world.owns(i) else None, world.owner(i), world)
        if world.is_main and not world.owns(i):
            path = _batch_path(workdir, i)
            if path is not None and not path.exists():  # a filesystem other ranks do not share
                _write_batch(path, images)
        out.append(images)
        if after is not None:
            after(i, images, world.owns(i) and mine[i][1])
    return out


def _batch_path(workdir: Path | None, index: int) -> Path | None:
    return None if workdir is None else Path(workdir) / f"batch-{index:04d}.safetensors"


def _write_batch(path: Path | None, images: torch.Tensor) -> None:
    if path is None:
        return
    from safetensors.torch import save_file

    from ..io import atomic_write, tensors_hash

    digest = tensors_hash({"images": images})
    atomic_write(path, lambda p: save_file({"images": images}, str(p), metadata={"sha256": digest}))


def _verified_batch(path: Path, size: int) -> torch.Tensor | None:
    """A finished batch file whose images still hash to what was written, or None (with a
    warning) when it is damaged, unreadable, of another size, or from before batches were hashed."""
    import warnings

    from safetensors import safe_open

    from ..io import tensors_hash

    try:
        with safe_open(str(path), framework="pt") as f:
            written = (f.metadata() or {}).get("sha256")
            t = f.get_tensor("images")
    except Exception as exc:  # noqa: BLE001 - any unreadable leftover is redone, never trusted
        warnings.warn(f"{path} is unreadable ({type(exc).__name__}); synthesizing that batch again", stacklevel=3)
        return None
    if (written is None or t.shape[0] != size or tensors_hash({"images": t}) != written
            or (t.is_floating_point() and not torch.isfinite(t).all())):
        warnings.warn(f"{path} fails its integrity check (modified, damaged, or written before batches were "
                      "hashed); synthesizing that batch again", stacklevel=3)
        return None
    return t


__all__ = ["Synthesizer", "batches_of", "resumable_batches", "seeded_generator", "teacher_features",
           "teacher_soft_labels"]
