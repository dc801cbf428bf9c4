"""The dynamic batch dimension for ``torch.export``, in the form every supported torch accepts.

A named ``Dim("batch", min=1)`` asks torch to prove the model works for *every* batch size in
that range, and fails when tracing adds a bound of its own. On torch 2.11 with CUDA, BatchNorm
adds ``batch <= 65535`` (its kernel's grid limit): export then raised "Constraints violated
(batch)! ... Suggested fixes: batch = Dim('batch', max=65535)". ``Dim.DYNAMIC`` (torch >= 2.6)
takes whatever range torch infers instead, and still refuses a batch fixed to a constant.
"""
from __future__ import annotations

from typing import Any


def dynamic_batch() -> Any:
    """A dimension spec for a dynamic batch: ``Dim.DYNAMIC`` where torch has it, else a named Dim."""
    from torch.export import Dim

    return getattr(Dim, "DYNAMIC", None) or Dim("batch")


def batch_dynamic_shapes(count: int) -> tuple[dict[int, Any], ...]:
    """``dynamic_shapes`` for ``count`` positional inputs, each with a dynamic batch dimension 0."""
    return tuple({0: dynamic_batch()} for _ in range(count))


__all__ = ["batch_dynamic_shapes", "dynamic_batch"]
