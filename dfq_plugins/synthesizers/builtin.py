"""Registers the built-in data sources through the ``dfq_plugins`` entry point."""
from __future__ import annotations

from ..hookspecs import hookimpl


@hookimpl
def dfq_register_synthesizers(register) -> None:
    from .diffdfq import DiffDFQSynthesizer
    from .dynadfq import DynaDFQSynthesizer
    from .genie import GenieSynthesizer
    from .hast import HASTSynthesizer
    from .intraq import IntraQSynthesizer
    from .simple import NoiseSynthesizer, RealSynthesizer
    from .zeroq import ZeroQSynthesizer

    register("noise", NoiseSynthesizer)
    register("real", RealSynthesizer)
    register("zeroq", ZeroQSynthesizer)
    register("intraq", IntraQSynthesizer)
    register("hast", HASTSynthesizer)
    register("genie", GenieSynthesizer)
    register("dynadfq", DynaDFQSynthesizer)
    register("diffdfq", DiffDFQSynthesizer)
