"""``dfq``'s entry point: the parser each subcommand module fills, torchrun, signals and error reporting."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from typing import Any

# as the PT2E adapter does on import: `dfq run` can load torchao (through a .pt2's ops) before it, and
# torchao's probing of its CUDA kernels then prints a "Failed to load" line for every run on a CPU machine
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

from ..logfilters import quiet_third_party_notices  # noqa: E402

quiet_third_party_notices()  # before anything imports torchao

from .. import distributed  # noqa: E402
from ..errors import DFQError  # noqa: E402
from . import bench, cache, deploy, dynamic, quantize, scale  # noqa: E402
from .common import DISTRIBUTED_COMMANDS  # noqa: E402

# registration order is the order `dfq --help` lists the subcommands in
SUBCOMMAND_MODULES = (cache, quantize, bench, dynamic, deploy, scale)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dfq", description="Data-free calibration for torch.ao FX, torchao PT2E, NNCF")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (or DFQ_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    for module in SUBCOMMAND_MODULES:
        module.register(sub)
    return p


def _join_torchrun_group(args: argparse.Namespace) -> None:
    """Under torchrun: join the process group now, and let rank 0 alone print and write."""
    if args.command not in DISTRIBUTED_COMMANDS:
        raise DFQError(f"under torchrun only {', '.join(DISTRIBUTED_COMMANDS)} run (split over the processes); "
                       f"run `dfq {args.command}` as one process")
    from ..device import resolve_device

    world = distributed.init_from_env(resolve_device(getattr(args, "device", None)))
    if not world.is_main:  # one voice: rank 0 reports for the group
        args.quiet = True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of this process


def _sigterm_interrupts() -> Any:
    """SIGTERM (a scheduler, ``kill``, a non-interactive shell's background job) stops a command as
    Ctrl-C does: finished batches, checkpoints and bench records are kept, one message, rc 130.
    (The distillation loop installs its own handler, which stops at a step boundary.)"""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = build_parser().parse_args(argv)
    from ..progress import configure_cli_logging

    previous_sigterm = _sigterm_interrupts()
    try:
        if distributed.launched_by_torchrun():
            _join_torchrun_group(args)
        configure_cli_logging(bool(getattr(args, "quiet", False)))
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted: finished batches and bench records are kept; rerun the same command to resume",
              file=sys.stderr)
        return 130
    except (DFQError, ValueError, OSError) as exc:  # OSError: a cache on a file, a full or read-only disk
        if args.debug or os.environ.get("DFQ_DEBUG", "") not in ("", "0"):
            raise
        print(f"dfq: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


if __name__ == "__main__":
    sys.exit(main())

