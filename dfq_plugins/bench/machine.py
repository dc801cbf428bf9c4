"""What CPU a record was measured on: int8 speedups and even int8 accuracy depend on it.

Without VNNI (AVX2 only) int8 kernels gain little over FP32 and may saturate; with AMX or
AVX512-BF16, OpenVINO runs an "FP32" model in bf16 by default. A latency figure without the
CPU's name and these flags cannot be compared with another.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def cpu_summary(cpuinfo: str | None = None) -> dict[str, Any]:
    """``{"cpu": model name, "isa": the int8/bf16-relevant flags present, "logical_cpus": n}``."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: name only
            cpuinfo = ""
    name, flags = platform.processor() or platform.machine(), set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            name = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    return {"cpu": name, "isa": [f for f in INT8_FLAGS if f in flags], "logical_cpus": os.cpu_count()}


__all__ = ["INT8_FLAGS", "cpu_summary"]
