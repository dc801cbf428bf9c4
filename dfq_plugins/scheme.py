"""Quantization schemes, independent of any toolchain; adapters map them onto their configs."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Any

_NAME = re.compile(r"^w(\d+)a(\d+)(-symact)?$")


@dataclass(frozen=True)
class LayerBits:
    """Bit-widths for one layer that overrides the scheme's defaults (e.g. an 8-bit first conv)."""

    weight_bits: int
    act_bits: int


@dataclass(frozen=True)
class QuantScheme:
    """Weight/activation bit-widths and granularity.

    Defaults follow the common static-quantization setting: per-channel symmetric weights,
    per-tensor affine activations, every conv/linear at the same bits unless ``first_layer``
    or ``last_layer`` override it.
    """

    weight_bits: int = 8
    act_bits: int = 8
    weight_per_channel: bool = True
    weight_symmetric: bool = True
    act_symmetric: bool = False
    first_layer: LayerBits | None = None
    last_layer: LayerBits | None = None

    def __post_init__(self) -> None:
        for label, bits in (("weight_bits", self.weight_bits), ("act_bits", self.act_bits)):
            if not 2 <= bits <= 8:
                raise ValueError(f"{label}={bits}: integer quantization here supports 2 to 8 bits")

    @property
    def name(self) -> str:
        base = f"w{self.weight_bits}a{self.act_bits}"
        extras = []
        if not self.weight_per_channel:
            extras.append("wpt")
        if not self.weight_symmetric:
            extras.append("wasym")
        if self.act_symmetric:
            extras.append("symact")
        if self.first_layer:
            extras.append(f"first{self.first_layer.weight_bits}{self.first_layer.act_bits}")
        if self.last_layer:
            extras.append(f"last{self.last_layer.weight_bits}{self.last_layer.act_bits}")
        return "-".join([base, *extras])

    @property
    def has_overrides(self) -> bool:
        return self.first_layer is not None or self.last_layer is not None

    def weight_range(self, bits: int | None = None) -> tuple[int, int]:
        """Signed integer range for weights (symmetric or affine alike, stored as int8)."""
        b = bits or self.weight_bits
        return -(2 ** (b - 1)), 2 ** (b - 1) - 1

    def act_range(self, bits: int | None = None) -> tuple[int, int]:
        """Integer range for activations: unsigned for affine, signed for symmetric."""
        b = bits or self.act_bits
        if self.act_symmetric:
            return -(2 ** (b - 1)), 2 ** (b - 1) - 1
        return 0, 2**b - 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantScheme:
        d = dict(d)
        base = cls.parse(d.pop("name")) if "name" in d else cls()
        for key in ("first_layer", "last_layer"):
            if isinstance(d.get(key), dict):
                d[key] = LayerBits(**d[key])
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown QuantScheme fields {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return replace(base, **d)

    @classmethod
    def parse(cls, value: str | dict[str, Any] | QuantScheme) -> QuantScheme:
        """Accept ``"w4a8"``, a dict (TOML table) or a QuantScheme."""
        if isinstance(value, QuantScheme):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        match = _NAME.match(str(value).strip().lower())
        if not match:
            raise ValueError(
                f"unknown scheme {value!r}: use 'w<bits>a<bits>' such as 'w8a8', 'w4a8', 'w4a4' "
                "(suffix '-symact' for symmetric activations), "
                "or a table with weight_bits/act_bits/..."
            )
        return cls(weight_bits=int(match.group(1)), act_bits=int(match.group(2)),
                   act_symmetric=bool(match.group(3)))


W8A8 = QuantScheme(8, 8)
W4A8 = QuantScheme(4, 8)
W4A4 = QuantScheme(4, 4)
