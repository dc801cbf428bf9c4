"""Distillation loops (distiller plugins): one training core, one module per method."""
from .base import Distiller
from .loop import TrainingRun

__all__ = ["Distiller", "TrainingRun"]
