"""The JSON sidecar beside every exported artefact: what it is, how it was made, and its hash.

The hash is checked before the artefact is parsed, so a damaged or swapped file is refused
with a clear error instead of being half-loaded.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

from ..errors import CorruptArtifactError
from ..io import atomic_write_text

SIDECAR_FORMAT = 1
VERSIONED = ("dfq-plugins", "torch", "torchao", "nncf", "openvino")


def sidecar_path(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + ".json")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def artifact_files(artifact: Path) -> list[Path]:
    """The files that make up an artefact (an OpenVINO IR is an .xml plus its .bin)."""
    files = [artifact]
    if artifact.suffix == ".xml":
        files.append(artifact.with_suffix(".bin"))
    return files


def write_sidecar(artifact: Path, record: dict[str, Any]) -> Path:
    hashes = {p.name: file_sha256(p) for p in artifact_files(artifact)}
    sizes = {p.name: p.stat().st_size for p in artifact_files(artifact)}
    body = {"sidecar_format": SIDECAR_FORMAT, "file": artifact.name, "sha256": hashes, "bytes": sizes,
            "versions": package_versions(), **record}
    path = sidecar_path(artifact)
    atomic_write_text(path, json.dumps(body, indent=1, default=str) + "\n")
    return path


def update_sidecar(artifact: Path, fields: dict[str, Any]) -> Path:
    """Add ``fields`` to a verified sidecar (e.g. a top-1 measured after export); hashes kept."""
    body = {**read_sidecar(artifact), **fields}
    path = sidecar_path(artifact)
    atomic_write_text(path, json.dumps(body, indent=1, default=str) + "\n")
    return path


def read_sidecar(artifact: Path, verify: bool = True) -> dict[str, Any]:
    """The sidecar of ``artifact``; with ``verify``, every file's sha256 checked against it."""
    path = sidecar_path(artifact)
    if not path.exists():
        raise CorruptArtifactError(f"{artifact} has no sidecar {path.name}: it was not written by "
                                   "dfq_plugins.export (or the sidecar was lost); re-export the model")
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CorruptArtifactError(f"{path} is not readable JSON ({exc}); re-export the model") from exc
    if body.get("sidecar_format") != SIDECAR_FORMAT or body.get("file") != artifact.name:
        raise CorruptArtifactError(f"{path} does not describe {artifact.name} (format {body.get('sidecar_format')}, "
                                   f"file {body.get('file')!r})")
    if verify:
        for p in artifact_files(artifact):
            want = body.get("sha256", {}).get(p.name)
            if not p.exists():
                raise CorruptArtifactError(f"{p} is missing; an artefact and its sidecar travel together")
            if want is None or file_sha256(p) != want:
                raise CorruptArtifactError(f"{p}: sha256 does not match its sidecar (damaged or modified after "
                                           "export); it is not loaded. Re-export, or copy it again")
    return body


__all__ = ["file_sha256", "package_versions", "read_sidecar", "sidecar_path", "update_sidecar", "write_sidecar"]
