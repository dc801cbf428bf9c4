"""Safe persistence helpers: atomic writes, content hashes, canonical JSON."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def short_hash(obj: Any, n: int = 20) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:n]


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes: what a saved set must still contain."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``.

    A crash or Ctrl-C leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


_PROCESS_START = time.time()


class CacheLocationError(OSError):
    """A cache location that cannot hold our files (a file, or not writable)."""


def writable_folder(path: Path, what: str = "cache") -> Path:
    """Create ``path`` if needed and prove a file can be written there, before any work starts;
    also remove temporary files that runs killed mid-write left behind (older than this process)."""
    path = Path(path)
    hint = ("set DFQ_CACHE to a writable folder, or pass cache=False in the Python API to run without a cache")
    if path.exists() and not path.is_dir():
        raise CacheLocationError(f"the {what} location {path} is a file, not a folder; {hint}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".dfq-write-probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CacheLocationError(f"cannot write to the {what} folder {path} "
                                 f"({type(exc).__name__}: {exc.strerror or exc}); {hint}") from exc
    remove_orphaned_temporaries(path)
    return path


def remove_orphaned_temporaries(folder: Path, older_than: float | None = None) -> int:
    """Delete ``atomic_write`` temporaries (``.<name>.<random>.tmp``) under ``folder`` last written
    before ``older_than`` (default: this process's start), i.e. by runs killed mid-write."""
    cutoff = _PROCESS_START if older_than is None else older_than
    removed = 0
    for tmp in Path(folder).rglob(".*.tmp"):
        try:
            if tmp.is_file() and tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed += 1
        except OSError:
            continue  # another process took it, or we may not delete it: not ours to insist
    return removed


@contextlib.contextmanager
def entry_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an OS lock on one cache entry so that two identical runs share the work: the second
    waits, then finds the first one's result. Released if the process dies. The lock files live in
    ``<cache>/locks/`` so the entries' own folders hold entries only."""
    from filelock import FileLock, Timeout

    locks = cache_root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(locks / f"{Path(path).parent.name}-{Path(path).name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"dfq: waiting for another process that is computing the same {what} ({path.name})", file=sys.stderr)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def cache_root() -> Path:
    """``$DFQ_CACHE`` or ``~/.cache/dfq_plugins``."""
    env = os.environ.get("DFQ_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dfq_plugins"


def load_weights_file(path: str | Path) -> Any:
    """``torch.load`` of a weights file, tensors and plain containers only. A file that needs more
    (a crafted or foreign pickle) is refused with our own message: torch's advice to retry with
    ``weights_only=False`` would run whatever code the file carries."""
    import pickle

    from .errors import CorruptArtifactError

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptArtifactError(
            f"{path} is not a plain weights file ({type(exc).__name__}: {first[:160]}); dfq_plugins loads "
            "tensors only and never unpickles code. Replace it with the original weights file") from None
