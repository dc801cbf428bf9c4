"""Built-in data sources (synthesizer plugins) and their shared base."""
from .base import Synthesizer

__all__ = ["Synthesizer"]
