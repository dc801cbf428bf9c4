"""Exceptions that tell the user what was wrong and what to do about it."""
from __future__ import annotations


class DFQError(Exception):
    """Base class for every error raised on purpose by dfq-plugins."""


class UnknownNameError(DFQError, KeyError):
    """A synthesizer, toolchain, model or distiller name that no plugin registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnsupportedSchemeError(DFQError, ValueError):
    """A quantization scheme that the chosen toolchain cannot express."""


class UntraceableModelError(DFQError, RuntimeError):
    """A model that a toolchain's graph capture cannot take."""


class MissingBatchNormError(DFQError, ValueError):
    """A BatchNorm-statistics method asked of a model without BatchNorm layers."""


class AssetsMissingError(DFQError, FileNotFoundError):
    """Pretrained weights or evaluation images that are not where we looked."""


class CorruptArtifactError(DFQError, ValueError):
    """A saved calibration set whose content does not match its manifest."""


class PluginError(DFQError, RuntimeError):
    """A plugin that broke the contract (duplicate name, bad hook)."""


class NonFiniteError(DFQError, ValueError):
    """NaN or infinity where a model, a synthesized image or a loss must be finite."""


class DeviceError(DFQError, ValueError):
    """A device that does not exist here, or a model spread over several devices."""


class ModelFactoryError(DFQError, RuntimeError):
    """A user's ``--model FILE.py:FACTORY`` that raised while it was imported or called."""
