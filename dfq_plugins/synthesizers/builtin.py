"""Registers the built-in data sources through the ``dfq_plugins`` entry point."""
from __future__ import annotations

from ..hookspecs import hookimpl


@hookimpl
def dfq_register_synthesizers(register) -> None:
    from .simple import NoiseSynthesizer, RealSynthesizer
    from .zeroq import ZeroQSynthesizer

    register("noise", NoiseSynthesizer)
    register("real", RealSynthesizer)
    register("zeroq", ZeroQSynthesizer)
