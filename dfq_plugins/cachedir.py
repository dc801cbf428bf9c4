"""What the cache holds (``dfq cache``): calibration sets and distillation checkpoints.

Everything here only reads headers (no tensors are loaded) except ``clear``, which deletes.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from .io import cache_root

KINDS = ("calibration", "distill")


@dataclass
class CacheEntry:
    kind: str  # "calibration" or "distill"
    name: str  # file stem or run folder
    path: Path
    size_bytes: int
    modified: float
    summary: str  # method, samples, seed / step reached

    def row(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.modified))
        return f"{self.kind:11s} {self.name:34s} {self.size_bytes / 1e6:8.1f} MB  {when}  {self.summary}"


def _header(path: Path, key: str) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get(key, "{}"))
    except Exception:  # noqa: BLE001 - a damaged file is listed as such, never fatal here
        return {"unreadable": True}


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def entries(root: Path | None = None) -> list[CacheEntry]:
    """Every calibration set and distillation run under the cache, newest first."""
    root = root or cache_root()
    out = []
    for path in sorted((root / "calibration").glob("*.safetensors")):
        h = _header(path, "dfq_manifest")
        m = h.get("manifest", {})
        summary = ("unreadable" if h.get("unreadable") else
                   f"{m.get('method', '?')}, {h.get('num_samples', '?')} images, seed {m.get('seed', '?')}")
        out.append(CacheEntry("calibration", path.stem, path, _size(path), path.stat().st_mtime, summary))
    for partial in sorted((root / "calibration").glob("*.partial")):
        done = len(list(partial.glob("batch-*.safetensors")))
        out.append(CacheEntry("calibration", partial.name, partial, _size(partial), partial.stat().st_mtime,
                              f"interrupted synthesis, {done} batches done (resumes on rerun)"))
    for run in sorted(p for p in (root / "distill").glob("*") if p.is_dir()):
        ckpt = run / "checkpoint.safetensors"
        h = _header(ckpt, "dfq_checkpoint") if ckpt.exists() else {}
        summary = ("no checkpoint" if not ckpt.exists() else "unreadable" if h.get("unreadable")
                   else f"step {h.get('step', '?')}")
        out.append(CacheEntry("distill", run.name, run, _size(run), run.stat().st_mtime, summary))
    return sorted(out, key=lambda e: e.modified, reverse=True)


def find(name: str, root: Path | None = None) -> CacheEntry:
    """The entry whose name is ``name`` or starts with it (a unique prefix)."""
    matches = [e for e in entries(root) if e.name == name or e.name.startswith(name)]
    if len(matches) != 1:
        what = "no" if not matches else f"{len(matches)}"
        raise ValueError(f"{what} cache entries match {name!r}; `dfq cache list` shows their names")
    return matches[0]


def show(entry: CacheEntry) -> dict[str, Any]:
    """The entry's header: a set's manifest, or a checkpoint's step and history."""
    if entry.kind == "calibration" and entry.path.is_file():
        return _header(entry.path, "dfq_manifest")
    ckpt = entry.path / "checkpoint.safetensors"
    return _header(ckpt, "dfq_checkpoint") if ckpt.exists() else {"batches": sorted(
        p.name for p in entry.path.glob("batch-*.safetensors"))}


def clear(kind: str, root: Path | None = None) -> tuple[int, int]:
    """Delete every entry of ``kind`` ("calibration", "distill" or "all"); (entries, bytes) freed."""
    if kind not in (*KINDS, "all"):
        raise ValueError(f"clear what? {kind!r}; choose calibration, distill or all")
    count = freed = 0
    for e in entries(root):
        if kind not in ("all", e.kind):
            continue
        freed += e.size_bytes
        count += 1
        if e.path.is_dir():
            shutil.rmtree(e.path, ignore_errors=True)
        else:
            e.path.unlink(missing_ok=True)
            e.path.with_suffix(".json").unlink(missing_ok=True)
    return count, freed


__all__ = ["CacheEntry", "clear", "entries", "find", "show"]
