"""The one PluginManager, lazy entry-point loading, and the name registries built from it.

Loading rules: entry points of group ``dfq_plugins`` are loaded once, on first use. A plugin
that fails to import, or that implements a hook name we do not know (a typo), is reported
with its distribution and skipped; the others still load. ``DFQ_PLUGINS=a,b`` restricts
loading to the named entry points (dfq-plugins' own ``builtin-*`` are always loaded).

Names: dfq-plugins' built-ins register first, then the other plugins in the order they were
loaded (entry points by name). The first plugin to register a name keeps it; a later plugin that
claims a taken name is the one refused, reported by ``dfq plugins`` and warned about when the name
is used. ``DFQ_PLUGIN_OVERRIDES="zeroq=my-plugin,toolchains:torch-ao-fx=other"`` hands a name to
another plugin on purpose, with a warning every time it is used.
"""
from __future__ import annotations

import difflib
import importlib.metadata as md
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError, UnknownNameError

ENTRY_POINT_GROUP = "dfq_plugins"
OVERRIDES_ENV = "DFQ_PLUGIN_OVERRIDES"
OWN_DISTRIBUTION = "dfq-plugins"

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


@dataclass(frozen=True)
class NameConflict:
    """Two plugins registered one name: ``kept`` has it, ``refused`` does not."""

    kind: str
    name: str
    kept: str
    refused: str
    overridden: bool  # kept by DFQ_PLUGIN_OVERRIDES rather than by registration order

    def message(self) -> str:
        if self.overridden:
            return (f"{self.kind[:-1]} {self.name!r} is overridden by plugin {self.kept!r} ({OVERRIDES_ENV}); "
                    f"plugin {self.refused!r} also registers it")
        return (f"{self.kind[:-1]} {self.name!r} is registered by plugin {self.kept!r} first; plugin "
                f"{self.refused!r} also claims it and was refused. To use {self.refused!r}'s, set "
                f"{OVERRIDES_ENV}={self.kind}:{self.name}={self.refused}")


failures: list[PluginFailure] = []
_dist_of_plugin: dict[str, tuple[str, str]] = {}
_order: list[str] = []  # plugin names in registration order, dfq-plugins' built-ins first
_conflicts: dict[str, list[NameConflict]] = {}  # per kind, from its last collect()


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
    _order.append(name)


def unregister_plugin(name: str) -> None:
    pm.unregister(name=name)
    _dist_of_plugin.pop(name, None)
    if name in _order:
        _order.remove(name)


def _is_builtin(ep_name: str, dist: str) -> bool:
    """dfq-plugins' own entry points; another distribution cannot claim the rank by its names."""
    return ep_name.startswith("builtin-") and dist == OWN_DISTRIBUTION


def _wanted(ep_name: str, dist: str = OWN_DISTRIBUTION) -> bool:
    only = os.environ.get("DFQ_PLUGINS")
    if only is None or _is_builtin(ep_name, dist):
        return True
    return ep_name in {n.strip() for n in only.split(",") if n.strip()}


def _dist_name(ep: md.EntryPoint) -> str:
    return ep.dist.name if ep.dist else "(unknown)"


def overrides() -> dict[tuple[str | None, str], str]:
    """``DFQ_PLUGIN_OVERRIDES`` parsed: (kind or None, name) -> the plugin that gets the name."""
    raw = os.environ.get(OVERRIDES_ENV, "")
    out: dict[tuple[str | None, str], str] = {}
    for item in (i.strip() for i in raw.split(",")):
        if not item:
            continue
        key, sep, plugin = item.partition("=")
        kind, colon, name = key.strip().rpartition(":")
        if not sep or not plugin.strip() or not name:
            raise PluginError(f"{OVERRIDES_ENV}: {item!r} is not 'name=plugin' or 'kind:name=plugin' "
                              "(e.g. zeroq=my-plugin or synthesizers:zeroq=my-plugin)")
        if colon and kind not in hookspecs.HOOK_KINDS:
            raise PluginError(f"{OVERRIDES_ENV}: unknown kind {kind!r} in {item!r}; "
                              f"kinds: {', '.join(hookspecs.HOOK_KINDS)}")
        out[(kind if colon else None, name)] = plugin.strip()
    return out


def load_plugins() -> None:
    """Load every entry point of group ``dfq_plugins`` once; report and skip broken ones."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        _loaded = True
        eps = sorted(md.entry_points(group=ENTRY_POINT_GROUP),
                     key=lambda e: (not _is_builtin(e.name, _dist_name(e)), e.name))
        for ep in eps:
            dist = _dist_name(ep)
            version = ep.dist.version if ep.dist else ""
            if not _wanted(ep.name, dist):
                continue
            if pm.has_plugin(ep.name):
                taken = _dist_of_plugin.get(ep.name, ("(in-process)", ""))[0]
                if taken != dist:
                    failures.append(PluginFailure(ep.name, dist, version, f"entry point name {ep.name!r} is "
                                                  f"already taken by {taken}; rename the entry point"))
                continue
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
            _order.append(ep.name)


def _rank(plugin: str) -> int:
    return _order.index(plugin) if plugin in _order else len(_order)


def collect(kind: str) -> dict[str, Entry]:
    """Ask every plugin to register its things of ``kind``; return them by name.

    Each hook implementation is called on its own so that every entry is attributed to its
    plugin, and a plugin whose hook raises is reported without hiding the others. Plugins are
    asked in registration order and the first to claim a name keeps it (module docstring).
    """
    load_plugins()
    hook_name = hookspecs.HOOK_KINDS[kind]
    caller = getattr(pm.hook, hook_name)
    entries: dict[str, Entry] = {}
    wanted = overrides()
    conflicts: list[NameConflict] = []
    for impl in sorted(caller.get_hookimpls(), key=lambda i: _rank(i.plugin_name)):
        dist, version = _dist_of_plugin.get(impl.plugin_name, ("(in-process)", ""))

        staged: list[Entry] = []  # a hook that raises contributes nothing, not what it registered first

        def register(name: str, obj: Any, _plugin: str = impl.plugin_name, _dist: str = dist,
                     _version: str = version, _staged: list[Entry] = staged, **options: Any) -> None:
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {_plugin!r} registered a {kind[:-1]} under {name!r}; names are non-empty "
                                  "strings")
            _staged.append(Entry(kind, name, obj, _plugin, _dist, _version, options))

        try:
            impl.function(register=register)
        except Exception as exc:
            failure = PluginFailure(impl.plugin_name, dist, version, f"{hook_name}: {type(exc).__name__}: {exc}")
            if failure not in failures:
                failures.append(failure)
            continue
        for entry in staged:
            _claim(entries, conflicts, wanted, entry)
    _conflicts[kind] = conflicts
    return entries


def _claim(entries: dict[str, Entry], conflicts: list[NameConflict], wanted: dict[Any, str], entry: Entry) -> None:
    """Give ``entry`` its name unless an earlier plugin holds it (and the user did not pick this one)."""
    prev = entries.get(entry.name)
    if prev is not None and prev.plugin != entry.plugin:
        owner = wanted.get((entry.kind, entry.name), wanted.get((None, entry.name)))
        if owner == entry.plugin:
            conflicts.append(NameConflict(entry.kind, entry.name, entry.plugin, prev.plugin, overridden=True))
            entries[entry.name] = entry
        else:
            conflicts.append(NameConflict(entry.kind, entry.name, prev.plugin, entry.plugin,
                                          overridden=owner == prev.plugin))
        return
    entries[entry.name] = entry


def conflicts() -> list[NameConflict]:
    """Every name two plugins claimed, as of the last collect of each kind."""
    for kind in hookspecs.HOOK_KINDS:
        collect(kind)
    return [c for kind in hookspecs.HOOK_KINDS for c in _conflicts.get(kind, [])]


def get(kind: str, name: str) -> Entry:
    """The entry registered under ``name``, or an error listing the names that exist.

    Warns when another plugin also claims the name (refused, or overridden on purpose)."""
    entries = collect(kind)
    if name in entries:
        for c in _conflicts.get(kind, []):
            if c.name == name:
                warnings.warn(c.message(), stacklevel=2)
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
    from .config import validate_options

    entry = get(kind, name)
    factory: Callable[..., Any] = entry.obj
    options = validate_options(factory, dict(config or {}), f"{kind[:-1]} {name!r}")
    try:
        return factory(**options)
    except TypeError as exc:
        raise UnknownNameError(f"bad configuration for {kind[:-1]} {name!r}: {exc}") from exc
