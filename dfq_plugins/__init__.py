"""dfq-plugins: data-free calibration for the quantization toolchains people already use."""
from .api import distill, evaluate, quantize, synthesize
from .data import CalibrationSet
from .deploy import export
from .deploy import load as load_exported
from .hookspecs import hookimpl
from .scheme import LayerBits, QuantScheme
from .spec import InputSpec
from .teacher import Teacher

__version__ = "0.1.0"
__all__ = [
           "CalibrationSet",
           "InputSpec",
           "LayerBits",
           "QuantScheme",
           "Teacher",
           "__version__",
           "distill",
           "evaluate",
           "export",
           "hookimpl",
           "load_exported",
           "quantize",
           "synthesize",
]
