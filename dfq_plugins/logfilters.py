"""Third-party log lines a dfq user can do nothing about, dropped by their exact message.

torchao registers an Enum as a pytree constant, which torch now reports once per process; and
with ``TORCHAO_FORCE_SKIP_LOADING_SO_FILES`` (which dfq sets, so a CPU machine is spared one
"Failed to load" line per CUDA kernel library) torchao says it skipped them. Neither tells the user
anything to do. Only these messages are dropped; everything else those loggers say still shows.
"""
from __future__ import annotations

import logging

NOTICES: dict[str, tuple[str, ...]] = {
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
    "torchao": ("Skipping import of cpp extensions due to TORCHAO_FORCE_SKIP_LOADING_SO_FILES",),
}


class DropNotices(logging.Filter):
    """Drops records whose message contains one of ``fragments``."""

    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def quiet_third_party_notices() -> None:
    """Install the filters (once per logger, however often it is called)."""
    for name, fragments in NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropNotices) for f in logger.filters):
            logger.addFilter(DropNotices(fragments))


__all__ = ["NOTICES", "DropNotices", "quiet_third_party_notices"]
