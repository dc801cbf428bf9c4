"""Entry point: registers the ``nncf`` toolchain (NNCF itself is imported on first use)."""
from dfq_plugins import hookimpl


@hookimpl
def dfq_register_toolchains(register) -> None:
    from .toolchain import NNCFToolchain

    register("nncf", NNCFToolchain)
