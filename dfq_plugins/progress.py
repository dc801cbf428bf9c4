"""One progress style for the whole project: a tqdm bar on a terminal, log lines elsewhere.

In a non-TTY log (CI, ``nohup``, a scheduler) a bar's carriage returns pile up into one endless
line, so there progress goes to the ``dfq_plugins`` logger instead: one line at the start, about
every 30 s, and at the end, with the rate and the latest losses. ``--quiet`` turns both off.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger("dfq_plugins")
LOG_EVERY_S = 30.0


def configure_cli_logging(quiet: bool) -> None:
    """The CLI shows the package's INFO lines (cache reuse, resumes, non-TTY progress); --quiet only warnings."""
    _ensure_handler()
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def _ensure_handler() -> None:
    """A plain stderr handler when the application configured no logging at all."""
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s dfq %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


class LogProgress:
    """The part of tqdm's interface the project uses, written as log lines."""

    def __init__(self, total: int | None, desc: str, initial: int = 0, every_s: float = LOG_EVERY_S) -> None:
        _ensure_handler()
        self.total, self.desc, self.n, self.every_s = total, desc, initial, every_s
        self.postfix: dict[str, Any] = {}
        self._start = self._last = time.monotonic()
        self._start_n = initial
        self._closed = False
        log.info("%s: started%s", desc, f" at {initial}/{total}" if initial else f" ({total} steps)" if total else "")

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._last >= self.every_s:
            self._emit("")

    def set_postfix(self, values: dict[str, Any] | None = None, refresh: bool = False, **kwargs: Any) -> None:
        self.postfix = {**(values or {}), **kwargs}

    def _emit(self, prefix: str) -> None:
        self._last = time.monotonic()
        elapsed = self._last - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        where = f"{self.n}/{self.total}" if self.total else str(self.n)
        extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
        log.info("%s: %s%s (%.1f/s, %.0fs)%s", self.desc, prefix, where, rate, elapsed, extra)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._emit("done " if self.total is None or self.n >= self.total else "stopped at ")

    def __enter__(self) -> LogProgress:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(total: int | None = None, desc: str = "", enabled: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar on a terminal; :class:`LogProgress` lines when stderr is not one; nothing when disabled."""
    if enabled and not sys.stderr.isatty():
        return LogProgress(total, desc, initial=int(kwargs.get("initial", 0)))
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, file=sys.stderr,
                mininterval=0.5, **kwargs)
