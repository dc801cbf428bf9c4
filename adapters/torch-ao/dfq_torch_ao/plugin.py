"""Entry point: registers ``torch-ao-fx`` and ``torchao-pt2e`` (imports stay lazy)."""
from dfq_plugins import hookimpl


@hookimpl
def dfq_register_toolchains(register) -> None:
    from .fx import FxToolchain
    from .pt2e import PT2EToolchain

    register("torch-ao-fx", FxToolchain)
    register("torchao-pt2e", PT2EToolchain)
