"""Deployable artefacts: export a quantized model in its toolchain's own format, load it back
without unpickling, check it against its sidecar, and run it on a real int8 backend."""
from .artifact import FORMATS, Deployed, ExportError, export, load
from .sidecar import sidecar_path

__all__ = ["FORMATS", "Deployed", "ExportError", "export", "load", "sidecar_path"]
