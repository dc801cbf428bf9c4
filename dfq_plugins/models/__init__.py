"""Built-in model plugins and the ModelDef contract."""
from .base import EvalSet, ModelDef

__all__ = ["EvalSet", "ModelDef"]
