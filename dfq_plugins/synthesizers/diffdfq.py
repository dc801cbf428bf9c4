"""DiffDFQ (Qian et al.) synthesis: any base synthesizer, plus forward-diffusion levels stored
with the set and, optionally, the quantization-aware BN term during synthesis.

The returned CalibrationSet holds the clean base images (level 0, what a post-training
toolchain calibrates on, as in DiffDFQ's stage order) and everything the progressive-
calibration distiller needs to materialise every level (``DiffusionLevels.of(cs).level(T)``).
Published: IntraQ base, Q-aware weight 0.001 at the target bit-width, betas linspace(1e-4,
0.02, 79), one stored noise draw per image, 20 levels used by the trainer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import CalibrationSet
from ..diffusion import NOISE_MODES, DiffusionLevels
from ..teacher import Teacher
from .base import Synthesizer


@dataclass
class DiffDFQSynthesizer(Synthesizer):
    name = "diffdfq"
    has_optimization_loop = True
    base: str | dict[str, Any] = field(default_factory=lambda: {"name": "intraq"})
    num_levels: int = 20
    beta_start: float = 1e-4
    beta_end: float = 0.02
    schedule_steps: int = 79
    noise: str = "fixed"
    qaware_toolchain: str | None = "torch-ao-fx"
    qaware_scheme: str = "w4a4"
    qaware_weight: float = 0.001
    qaware_every: int = 4  # CPU budget; the published loop applies it every step (1)

    def __post_init__(self) -> None:
        if self.noise not in NOISE_MODES:
            raise ValueError(f"diffdfq noise={self.noise!r}; choose one of {NOISE_MODES}")
        if isinstance(self.base, str):
            self.base = {"name": self.base}
        if self.base.get("name") in (None, "diffdfq"):
            raise ValueError("diffdfq base must name another synthesizer, e.g. {name = 'intraq'}")
        self._base = self.base_synthesizer()
        self.needs_batchnorm = getattr(self._base, "needs_batchnorm", False)

    def base_synthesizer(self) -> Any:
        """The wrapped source, with the quantization-aware term handed to it when that is on."""
        import dataclasses

        from ..api import make_synthesizer

        base = make_synthesizer(dict(self.base))
        if not self.qaware_weight:
            return base
        if not hasattr(base, "qaware_weight"):
            raise ValueError(f"diffdfq's quantization-aware term needs an optimising base, not "
                             f"{base.name!r}; set qaware_weight=0")
        return dataclasses.replace(base, qaware_toolchain=self.qaware_toolchain, qaware_scheme=self.qaware_scheme,
                                   qaware_weight=self.qaware_weight, qaware_every=self.qaware_every)

    def config_dict(self) -> dict[str, Any]:
        d = super().config_dict()
        d["base"] = {"name": self._base.name, "version": self._base.version, **self._base.config_dict()}
        return d

    # the per-batch loop is the base's (so `dfq speed` and resume work through it)
    def optimize_batch(self, teacher: Teacher, n: int, seed: int, index: int, bar: Any) -> Any:
        return self._base.optimize_batch(teacher, n, seed, index, bar)

    def session(self, teacher: Teacher, seed: int):
        return self._base.session(teacher, seed)

    def teacher_layout(self, teacher: Teacher):
        return self._base.teacher_layout(teacher)

    def uses_channels_last(self, spec: Any) -> bool:
        return bool(getattr(self._base, "uses_channels_last", lambda _s: False)(spec))

    def synthesize(self, teacher: Teacher, num_samples: int, *, seed: int = 0, batch_size: int = 32,
                   progress: bool = True, workdir: Path | None = None) -> CalibrationSet:
        cs = self._base.synthesize(teacher, num_samples, seed=seed, batch_size=batch_size, progress=progress,
                                   workdir=workdir)
        cs.manifest.update(method=self.name, method_version=self.version, config=self.config_dict(),
                           base_method=self._base.name)
        DiffusionLevels.attach(cs, num_levels=self.num_levels, beta_start=self.beta_start,
                                        beta_end=self.beta_end, schedule_steps=self.schedule_steps,
                                        mode=self.noise, noise_seed=seed)
        return cs

    @property
    def iterations(self) -> int:
        return getattr(self._base, "iterations", 0)

    @iterations.setter
    def iterations(self, value: int) -> None:
        self._base.iterations = value

    @property
    def synthesis_batch_size(self) -> int:
        return getattr(self._base, "synthesis_batch_size", 0)

    @synthesis_batch_size.setter
    def synthesis_batch_size(self, value: int) -> None:
        self._base.synthesis_batch_size = value

