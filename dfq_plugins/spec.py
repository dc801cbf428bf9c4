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
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"InputSpec.num_classes={self.num_classes!r}: a classifier has at least 2 classes")
        if len(self.pixel_range) != 2 or not self.pixel_range[0] < self.pixel_range[1]:
            raise ValueError(f"InputSpec.pixel_range={self.pixel_range!r} must be (low, high) with low < high, "
                             "e.g. (0, 1) or (0, 255)")
        if any(d < 1 for d in self.shape):
            raise ValueError(f"InputSpec.shape={self.shape}: every dimension must be at least 1")

    @property
    def channels(self) -> int:
        return self.shape[0]

    def _stat(self, values: tuple[float, ...], device: torch.device | None = None) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1).to(device or "cpu")

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self._stat(self.mean, pixels.device)) / self._stat(self.std, pixels.device)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._stat(self.std, x.device) + self._stat(self.mean, x.device)

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (low, high) of valid images in normalised space, shaped (1, C, 1, 1)."""
        lo, hi = self.pixel_range
        return self.normalize(torch.full((1, self.channels, 1, 1), lo)), self.normalize(
            torch.full((1, self.channels, 1, 1), hi)
        )

    def clip(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` clamped per channel to the normalised values real pixels can take."""
        lo, hi = self.bounds()
        return x.clamp(lo.to(x.device), hi.to(x.device))

    def example(self, batch: int = 2, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.zeros(batch, *self.shape, device=device)

    def check_model(self, model: torch.nn.Module) -> None:
        """One dry forward of two example images: the model must take this shape and give
        ``num_classes`` logits, in float32 on a real device. A clear error otherwise, before any work."""
        tensors = [*model.parameters(), *model.buffers()]
        if any(t.device.type == "meta" for t in tensors):
            raise ValueError("the model's weights are on the meta device (not loaded); load them "
                             "(e.g. model.to_empty(device='cpu') then load_state_dict) before quantizing")
        dtypes = {t.dtype for t in tensors if t.is_floating_point()}
        if dtypes - {torch.float32}:
            raise ValueError(f"the model holds {sorted(str(d) for d in dtypes)} weights; the toolchains calibrate "
                             "float32 models: call model.float() first")
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                from .device import module_device

                out = model(self.example(2, module_device(model)))
        except RuntimeError as exc:
            raise ValueError(f"the model does not take inputs of InputSpec.shape {self.shape} "
                             f"({str(exc).splitlines()[0]}); check the spec's channels and size") from exc
        finally:
            model.train(was_training)
        logits = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise ValueError(f"the model should return (batch, classes) logits, got "
                             f"{getattr(logits, 'shape', type(logits).__name__)}")
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"the model gives {logits.shape[1]} logits but InputSpec.num_classes is "
                             f"{self.num_classes}; set num_classes={logits.shape[1]}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        return cls(
            shape=tuple(d["shape"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
            num_classes=int(d["num_classes"]), pixel_range=tuple(d.get("pixel_range", (0.0, 1.0))),
        )
