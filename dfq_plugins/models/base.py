"""What a model plugin registers: a loader plus, optionally, its real test set and real-data pool."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..spec import InputSpec


@dataclass
class EvalSet:
    """Real images already in the model's normalised input space, with labels."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    note: str = ""  # how the images were made, for the user (e.g. which transform an image folder ran)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class ModelDef:
    """A named model: ``load()`` gives (model, InputSpec); the rest is for measuring.

    ``source_defaults`` holds the model's CPU-budget recipe per source. ``test_set()`` is the real
    held-out set headline numbers come from; ``calibration_pool()``
    is a disjoint pool of real images for the ``real`` baseline. Both raise
    :class:`AssetsMissingError` when their files are absent.
    """

    name: str
    load: Callable[[], tuple[nn.Module, InputSpec]]
    description: str = ""
    test_set: Callable[[], EvalSet] | None = None
    calibration_pool: Callable[[], EvalSet] | None = None
    source_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-source settings that fit this model on a CPU (e.g. fewer zeroq iterations at 224x224);
    the CLI and bench start from them, and user settings override them."""
