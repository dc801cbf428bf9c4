"""Registers the built-in training loops through the ``dfq_plugins`` entry point."""
from __future__ import annotations

from ..hookspecs import hookimpl


@hookimpl
def dfq_register_distillers(register) -> None:
    from .adadfq import AdaDFQDistiller
    from .causal import CausalDFQDistiller
    from .diffdfq import DiffDFQDistiller
    from .kd import GDFQDistiller, KDDistiller
    from .reconstruct import ReconstructDistiller

    register("kd", KDDistiller)
    register("gdfq", GDFQDistiller)
    register("adadfq", AdaDFQDistiller)
    register("causal", CausalDFQDistiller)
    register("diffdfq", DiffDFQDistiller)
    register("reconstruct", ReconstructDistiller)
