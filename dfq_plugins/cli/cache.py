"""``dfq plugins`` and ``dfq cache``: what is installed, and what the cache holds."""
from __future__ import annotations

import argparse
import json
import sys

from .. import plugins
from ..errors import DFQError


def cmd_plugins(args: argparse.Namespace) -> int:
    rows = plugins.describe()
    conflicts = plugins.conflicts()
    if args.json:
        print(json.dumps({"plugins": rows, "failures": [f.__dict__ for f in plugins.failures],
                          "conflicts": [dict(c.__dict__, message=c.message()) for c in conflicts]}, indent=2))
        return 0
    for row in rows:
        regs = "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(row["registers"].items())) or "(nothing)"
        print(f"{row['plugin']:18s} {row['distribution']} {row['version']}  {regs}")
    for c in conflicts:
        print(f"{'OVERRIDDEN' if c.overridden else 'REFUSED'} {c.message()}", file=sys.stderr)
    for f in plugins.failures:
        print(f"FAILED {f.name} ({f.distribution} {f.version}): {f.error}", file=sys.stderr)
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from .. import cachedir
    from ..io import cache_root

    if args.action == "path":
        print(cache_root())
    elif args.action == "list":
        found = cachedir.entries()
        for e in found:
            print(e.row())
        total = sum(e.size_bytes for e in found)
        print(f"{len(found)} entries, {total / 1e6:.1f} MB in {cache_root()}")
    elif args.action == "show":
        if not args.name:
            raise DFQError("dfq cache show NAME: give an entry's name (or a unique prefix) from `dfq cache list`")
        print(json.dumps(cachedir.show(cachedir.find(args.name)), indent=2, default=str))
    elif args.action == "clear":
        what = args.name or "all"
        if not args.yes:
            raise DFQError(f"dfq cache clear {what} deletes cached sets/checkpoints under {cache_root()}; "
                           "add --yes to confirm")
        count, freed = cachedir.clear(what)
        print(f"removed {count} entries, {freed / 1e6:.1f} MB")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to ``dfq``'s sub-parsers."""
    sp = sub.add_parser("plugins", help="list plugins, their distributions and what they register")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_plugins)

    sp = sub.add_parser("cache", help="what the cache holds: path, list, show NAME, clear [calibration|distill|all]")
    sp.add_argument("action", choices=["path", "list", "show", "clear"])
    sp.add_argument("name", nargs="?", help="show: an entry name or unique prefix; clear: calibration, distill or all")
    sp.add_argument("--yes", action="store_true", help="clear: confirm the deletion")
    sp.set_defaults(func=cmd_cache)
