"""The one PluginManager, lazy entry-point loading, and the name registries built from it.

Loading rules: entry points of group ``dfq_plugins`` are loaded once, on first use. A plugin
that fails to import, or that implements a hook name we do not know (a typo), is reported
with its distribution and skipped; the others still load. ``DFQ_PLUGINS=a,b`` restricts
loading to the named entry points (the built-ins ``builtin-*`` are always loaded).
"""
from __future__ import annotations

import difflib
import importlib.metadata as md
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError, UnknownNameError

ENTRY_POINT_GROUP = "dfq_plugins"

pm = pluggy.PluginManager(hookspecs.PROJECT)
pm.add_hookspecs(hookspecs)

_lock = threading.Lock()
_loaded = False


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be used, and why."""

    name: str
    distribution: str
    version: str
    error: str


@dataclass
class Entry:
    """One named thing a plugin registered."""

    kind: str
    name: str
    obj: Any
    plugin: str
    distribution: str
    version: str
    options: dict[str, Any] = field(default_factory=dict)


failures: list[PluginFailure] = []
_dist_of_plugin: dict[str, tuple[str, str]] = {}


def _known_hooks() -> set[str]:
    return {name for name in dir(hookspecs) if name.startswith("dfq_register_")}


def _check_hook_names(plugin: object) -> None:
    """Raise for any ``dfq_*`` attribute that looks like a hook but matches no spec."""
    known = _known_hooks()
    for attr in dir(plugin):
        if not attr.startswith("dfq_") or attr in known:
            continue
        fn = getattr(plugin, attr, None)
        if callable(fn) and hasattr(fn, hookspecs.PROJECT + "_impl"):
            hint = difflib.get_close_matches(attr, sorted(known), n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise PluginError(f"unknown hook {attr!r}{extra}")
    pm.check_pending()


def register_plugin(plugin: object, name: str, distribution: str = "(in-process)", version: str = "") -> None:
    """Register a plugin object (module or instance), validating its hook names.

    Tests use this (with :func:`unregister_plugin`) to add temporary plugins.
    """
    load_plugins()
    pm.register(plugin, name=name)
    try:
        _check_hook_names(plugin)
    except Exception:
        pm.unregister(name=name)
        raise
    _dist_of_plugin[name] = (distribution, version)


def unregister_plugin(name: str) -> None:
    pm.unregister(name=name)
    _dist_of_plugin.pop(name, None)


def _wanted(ep_name: str) -> bool:
    only = os.environ.get("DFQ_PLUGINS")
    if only is None or ep_name.startswith("builtin-"):
        return True
    return ep_name in {n.strip() for n in only.split(",") if n.strip()}


def load_plugins() -> None:
    """Load every entry point of group ``dfq_plugins`` once; report and skip broken ones."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        _loaded = True
        for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if not _wanted(ep.name) or pm.has_plugin(ep.name):
                continue
            dist = ep.dist.name if ep.dist else "(unknown)"
            version = ep.dist.version if ep.dist else ""
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
                try:
                    _check_hook_names(plugin)
                except Exception:
                    pm.unregister(name=ep.name)
                    raise
            except Exception as exc:  # a broken plugin must never break discovery
                failures.append(PluginFailure(ep.name, dist, version, f"{type(exc).__name__}: {exc}"))
                continue
            _dist_of_plugin[ep.name] = (dist, version)


def collect(kind: str) -> dict[str, Entry]:
    """Ask every plugin to register its things of ``kind``; return them by name.

    Each hook implementation is called on its own so that every entry is attributed to its
    plugin, and a plugin whose hook raises is reported without hiding the others.
    """
    load_plugins()
    hook_name = hookspecs.HOOK_KINDS[kind]
    caller = getattr(pm.hook, hook_name)
    entries: dict[str, Entry] = {}
    for impl in reversed(caller.get_hookimpls()):  # registration order
        dist, version = _dist_of_plugin.get(impl.plugin_name, ("(in-process)", ""))

        def register(name: str, obj: Any, _plugin: str = impl.plugin_name, **options: Any) -> None:
            if name in entries and entries[name].plugin != _plugin:
                raise PluginError(
                    f"{kind[:-1]} {name!r} registered by both {entries[name].plugin!r} and {_plugin!r}"
                )
            entries[name] = Entry(kind, name, obj, _plugin, dist, version, options)

        try:
            impl.function(register=register)
        except Exception as exc:
            failure = PluginFailure(impl.plugin_name, dist, version, f"{hook_name}: {type(exc).__name__}: {exc}")
            if failure not in failures:
                failures.append(failure)
    return entries


def get(kind: str, name: str) -> Entry:
    """The entry registered under ``name``, or an error listing the names that exist."""
    entries = collect(kind)
    if name in entries:
        return entries[name]
    hint = difflib.get_close_matches(name, list(entries), n=1)
    did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
    known = ", ".join(sorted(entries)) or "(none)"
    install = ""
    if kind == "toolchains":
        install = " Toolchains live in separate distributions: pip install dfq-torch-ao or dfq-nncf."
    raise UnknownNameError(f"no {kind[:-1]} named {name!r}.{did_you_mean} Available: {known}.{install}")


def names(kind: str) -> list[str]:
    return sorted(collect(kind))


def describe() -> list[dict[str, Any]]:
    """One row per loaded plugin: its distribution, version and what it registered."""
    load_plugins()
    rows: dict[str, dict[str, Any]] = {}
    for name, _ in pm.list_name_plugin():
        dist, version = _dist_of_plugin.get(name, ("(in-process)", ""))
        rows[name] = {"plugin": name, "distribution": dist, "version": version, "registers": {}}
    for kind in hookspecs.HOOK_KINDS:
        for entry in collect(kind).values():
            rows.setdefault(entry.plugin, {"plugin": entry.plugin, "distribution": entry.distribution,
                                           "version": entry.version, "registers": {}})
            rows[entry.plugin]["registers"].setdefault(kind, []).append(entry.name)
    return list(rows.values())


def instantiate(kind: str, name: str, config: dict[str, Any] | None = None) -> Any:
    """Build the registered class/factory ``name`` with keyword ``config``."""
    entry = get(kind, name)
    factory: Callable[..., Any] = entry.obj
    try:
        return factory(**(config or {}))
    except TypeError as exc:
        raise UnknownNameError(f"bad configuration for {kind[:-1]} {name!r}: {exc}") from exc
