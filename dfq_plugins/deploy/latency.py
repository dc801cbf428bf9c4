"""Latency of several runners on the same input, timed alternately so drift hits them alike."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_alternately(runners: dict[str, Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, *,
                     rounds: int = 20, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per call of each runner. Each round calls every runner once, in turn,
    after ``warmup`` untimed calls each (compilation, caches)."""
    with torch.no_grad():
        for run in runners.values():
            for _ in range(warmup):
                run(x)
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(rounds):
            for name, run in runners.items():
                started = time.perf_counter()
                run(x)
                times[name].append((time.perf_counter() - started) * 1000.0)
    return {name: statistics.median(ts) for name, ts in times.items()}


__all__ = ["time_alternately"]
