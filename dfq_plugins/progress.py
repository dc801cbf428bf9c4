"""One progress-bar style for the whole project (tqdm), silent when disabled or not a TTY."""
from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def progress_bar(total: int | None = None, desc: str = "", enabled: bool = True, **kwargs: Any) -> tqdm:
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, file=sys.stderr,
                mininterval=0.5, **kwargs)
