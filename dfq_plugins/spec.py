"""What a model expects as input, stated rather than guessed."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class InputSpec:
    """Input shape (no batch), normalisation and class count of an image classifier.

    Pixels live in ``pixel_range`` (e.g. [0, 1] or [0, 255]); the model sees
    ``(pixel - mean) / std`` per channel. Synthesizers work in that normalised space and use
    :meth:`bounds` to keep images inside what real pixels can produce.
    """

    shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    pixel_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if len(self.shape) != 3:
            raise ValueError(f"InputSpec.shape must be (channels, height, width), got {self.shape}")
        channels = self.shape[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"InputSpec has {channels} channels but mean has {len(self.mean)} and std {len(self.std)} entries"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError("InputSpec.std must be positive")

    @property
    def channels(self) -> int:
        return self.shape[0]

    def _stat(self, values: tuple[float, ...]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self._stat(self.mean)) / self._stat(self.std)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._stat(self.std) + self._stat(self.mean)

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (low, high) of valid images in normalised space, shaped (1, C, 1, 1)."""
        lo, hi = self.pixel_range
        return self.normalize(torch.full((1, self.channels, 1, 1), lo)), self.normalize(
            torch.full((1, self.channels, 1, 1), hi)
        )

    def clip(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` clamped per channel to the normalised values real pixels can take."""
        lo, hi = self.bounds()
        return x.clamp(lo, hi)

    def example(self, batch: int = 2) -> torch.Tensor:
        return torch.zeros(batch, *self.shape)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        return cls(
            shape=tuple(d["shape"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
            num_classes=int(d["num_classes"]), pixel_range=tuple(d.get("pixel_range", (0.0, 1.0))),
        )
