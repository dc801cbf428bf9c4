"""Forward-diffusion noise levels of a calibration set (DiffDFQ stage 2).

Level 0 is the clean set; level T >= 1 is sqrt(abar_T) x + sqrt(1 - abar_T) eps with a linear
beta schedule. The schedule, the noise mode and the noise seed live in the set's manifest;
in ``fixed`` mode the one noise draw per image is stored in the set itself
(``metadata["diffusion_noise"]``), in ``per_level`` mode each level's draw is regenerated
from its seed (identical every time, no level copies on disk), and in ``resample`` mode
every call draws fresh noise (the ablation DiffDFQ's stored copies rule out).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .data import CalibrationSet

NOISE_MODES = ("fixed", "per_level", "resample")
NOISE_KEY = "diffusion_noise"


def linear_alphas_bar(beta_start: float, beta_end: float, steps: int) -> torch.Tensor:
    """abar for levels 0..steps (level 0 = 1, clean), betas = linspace(start, end, steps)."""
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


@dataclass
class DiffusionLevels:
    """The noise levels stored with a calibration set, materialised on demand."""

    clean: CalibrationSet
    alphas_bar: list[float]
    mode: str
    noise_seed: int

    @classmethod
    def attach(cls, cs: CalibrationSet, *, num_levels: int, beta_start: float = 1e-4, beta_end: float = 0.02,
               schedule_steps: int = 79, mode: str = "fixed", noise_seed: int = 0) -> DiffusionLevels:
        """Record the levels in ``cs`` (manifest, and the noise itself in ``fixed`` mode)."""
        if mode not in NOISE_MODES:
            raise ValueError(f"diffusion noise mode {mode!r}; choose one of {NOISE_MODES}")
        if not 1 <= num_levels <= schedule_steps + 1:
            raise ValueError(f"num_levels must be in [1, {schedule_steps + 1}] for a {schedule_steps}-step schedule")
        abar = linear_alphas_bar(beta_start, beta_end, schedule_steps)[:num_levels].tolist()
        cs.manifest["diffusion"] = {"alphas_bar": abar, "mode": mode, "noise_seed": noise_seed,
                                    "beta_start": beta_start, "beta_end": beta_end, "schedule_steps": schedule_steps}
        if mode == "fixed":
            cs.metadata[NOISE_KEY] = cls._draw(cs.inputs, noise_seed, 0)
        return cls(cs, abar, mode, noise_seed)

    @classmethod
    def of(cls, cs: CalibrationSet) -> DiffusionLevels:
        """The levels a (possibly reloaded) calibration set carries; a clear error if none."""
        info: dict[str, Any] | None = cs.manifest.get("diffusion")
        if info is None:
            raise ValueError("this calibration set has no diffusion levels; synthesize it with source 'diffdfq'")
        if info["mode"] == "fixed" and NOISE_KEY not in cs.metadata:
            raise ValueError("the set's diffusion noise is missing from its metadata (file edited or truncated)")
        return cls(cs, list(info["alphas_bar"]), info["mode"], int(info["noise_seed"]))

    def __len__(self) -> int:
        return len(self.alphas_bar)

    def noise_std(self, level: int) -> float:
        return (1.0 - self.alphas_bar[level]) ** 0.5

    @staticmethod
    def _draw(like: Any, seed: int, level: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * level + 17)
        return torch.randn(like.shape, generator=g, dtype=like.dtype)

    def images(self, level: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if not 0 <= level < len(self):
            raise IndexError(f"diffusion level {level} out of range 0..{len(self) - 1}")
        x = self.clean.inputs
        if level == 0:
            return x
        if self.mode == "fixed":
            eps = self.clean.metadata[NOISE_KEY]
        elif self.mode == "per_level":
            eps = self._draw(x, self.noise_seed, level)
        else:
            eps = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        a = self.alphas_bar[level]
        return a**0.5 * x + (1 - a) ** 0.5 * eps

    def level(self, level: int, generator: torch.Generator | None = None) -> CalibrationSet:
        """The set at ``level`` (same labels and batch size; no noise metadata, so it stays small)."""
        meta = {k: v for k, v in self.clean.metadata.items() if k != NOISE_KEY}
        manifest = {**self.clean.manifest, "diffusion_level": level}
        return CalibrationSet(self.images(level, generator), self.clean.batch_size, labels=self.clean.labels,
                              soft_labels=self.clean.soft_labels, metadata=meta, manifest=manifest)


__all__ = ["NOISE_MODES", "DiffusionLevels", "linear_alphas_bar"]
