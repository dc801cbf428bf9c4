"""Building the variants: one toolchain student per bit-width, calibrated and fine-tuned on
synthetic data with a distiller, then converted for deployment."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..data import CalibrationSet
from ..scheme import QuantScheme
from ..spec import InputSpec
from .bitflops import bit_flops


@dataclass
class Variant:
    """One bit-width of a dynamic model: the trainable student and its deployable conversion."""

    label: str
    scheme: QuantScheme
    student: nn.Module
    deployed: nn.Module
    bit_flops: int
    distill_steps: int = 0
    distill_seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


def parse_bits(value: str | list[int] | tuple[int, ...]) -> list[int]:
    """``"4,6,8"`` -> [4, 6, 8] (sorted, unique)."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    bits = sorted({int(b) for b in items if str(b).strip()})
    if len(bits) < 2:
        raise ValueError(f"a dynamic model needs at least two bit-widths, got {value!r} (e.g. --bits 4,6,8)")
    return bits


def parse_steps(value: int | str | dict | None, bits: list[int], default: int) -> dict[int, int]:
    """``500`` (every bit-width), ``"4:500,6:200,8:0"`` or a TOML table -> {bits: steps}."""
    if value is None or value == "":
        return dict.fromkeys(bits, default)
    if isinstance(value, int):
        return dict.fromkeys(bits, value)
    pairs = value.items() if isinstance(value, dict) else \
        (item.split(":") for item in str(value).split(",") if item.strip())
    try:
        table = {int(k): int(v) for k, v in pairs}
    except ValueError:
        raise ValueError(f"steps {value!r}: give one number or BITS:STEPS pairs such as 4:500,6:200,8:0") from None
    missing = [b for b in bits if b not in table]
    if missing:
        raise ValueError(f"steps {value!r} names no budget for bit-widths {missing}")
    return {b: table[b] for b in bits}


def scheme_for(bits: int, template: str = "w{b}a{b}") -> QuantScheme:
    return QuantScheme.parse(template.format(b=bits))


def build_variants(model: nn.Module, spec: InputSpec, toolchain: Any, cs: CalibrationSet, bits: list[int], *,
                   steps: dict[int, int], distill: str | dict[str, Any] = "kd", template: str = "w{b}a{b}",
                   seed: int = 0, progress: bool = True) -> list[Variant]:
    """Calibrate a student per bit-width on ``cs``, fine-tune it for ``steps[b]`` steps (0: none;
    runs are cached and resume), convert it. Cheapest first."""
    from ..api import make_distiller, run_distiller

    out = []
    for b in bits:
        scheme = scheme_for(b, template)
        toolchain.check_scheme(scheme)
        student = toolchain.quantize(model, scheme, cs, trainable=True)
        info: dict[str, Any] = {}
        variant_steps, seconds = 0, 0.0
        if steps[b] > 0:
            distiller = make_distiller(distill, steps[b])
            student = run_distiller(distiller, model, spec, student, cs, toolchain, scheme, seed=seed,
                                    progress=progress)
            variant_steps, seconds = distiller.last_run.step, round(distiller.last_run.elapsed, 2)
            info["distill_config"] = distiller.config_dict()
        toolchain.freeze_ranges(student)  # routed or evaluated, a variant must not refit its ranges
        deployed = toolchain.convert(copy.deepcopy(student))
        out.append(Variant(toolchain.resolve_scheme(scheme, trainable=True).name, scheme, student, deployed, bit_flops(model, spec.shape, scheme),
                           variant_steps, seconds, info))
    return out
