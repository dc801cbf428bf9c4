"""Quantization schemes, independent of any toolchain; adapters map them onto their configs."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Any

_NAME = re.compile(r"^w(\d+)a(\d+)((?:-[a-z0-9]+)*)$")

PROTOCOLS = ("hardware", "A", "B")
WEIGHT_OBSERVERS = ("auto", "minmax", "mse")
ACT_OBSERVERS = ("auto", "minmax", "histogram")
BIAS_CORRECTION = ("auto", "on", "bn", "off")
# Name suffix tokens -> the field they set (parse) and back (name).
_TOKENS: dict[str, tuple[str, Any]] = {
    "symact": ("act_symmetric", True),
    "wmse": ("weight_observer", "mse"),
    "wminmax": ("weight_observer", "minmax"),
    "ahist": ("act_observer", "histogram"),
    "aminmax": ("act_observer", "minmax"),
    "protoa": ("protocol", "A"),
    "protob": ("protocol", "B"),
    "protohw": ("protocol", "hardware"),
    "bc": ("bias_correction", "on"),
    "bcbn": ("bias_correction", "bn"),
    "nobc": ("bias_correction", "off"),
}


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
    weight_observer: str = "auto"
    act_observer: str = "auto"
    protocol: str = "hardware"
    # Post-training only: subtract each layer's mean output shift from its bias, measured on the
    # calibration images as they are ("on") or with every BatchNorm re-standardizing them to its
    # running statistics ("bn", see dfq_plugins/quant/biascorrect.py); "off"; "auto" picks.
    bias_correction: str = "auto"
    # Mixed precision from sensitivity: the weights of the ``sensitive_8bit`` conv/linear layers whose
    # rounding alone moves the logits most (on the calibration images) stay at 8 bits. The toolchain
    # fills ``layer_bits`` with their names (dfq_plugins/quant/sensitivity.py); token ``-top<N>``.
    sensitive_8bit: int = 0
    layer_bits: tuple[tuple[str, LayerBits], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.sensitive_8bit, bool) or not isinstance(self.sensitive_8bit, int) \
                or self.sensitive_8bit < 0:
            raise ValueError(f"sensitive_8bit={self.sensitive_8bit!r}: a number of layers, 0 or more")
        for label, bits in (("weight_bits", self.weight_bits), ("act_bits", self.act_bits)):
            if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
                raise ValueError(f"{label}={bits!r}: integer quantization here supports 2 to 8 bits")
        for label, value, allowed in (("weight_observer", self.weight_observer, WEIGHT_OBSERVERS),
                                      ("act_observer", self.act_observer, ACT_OBSERVERS),
                                      ("protocol", self.protocol, PROTOCOLS),
                                      ("bias_correction", self.bias_correction, BIAS_CORRECTION)):
            if value not in allowed:
                raise ValueError(f"{label}={value!r}; choose one of {allowed}")

    def resolved(self) -> QuantScheme:
        """The scheme with ``auto`` observers and bias correction replaced by the measured best for its bit-widths, and
        a protocol's implied layer overrides filled in. Toolchains quantize the resolved scheme.

        Measured (docs/lowbit.md): below 8-bit weights, post-training, MinMax weights plus bias
        correction under the model's BatchNorm statistics (ResNet-20 PT2E W4A8, real data: 87.88 ->
        91.42; EfficientNet-Lite0: 14.6 -> 72.9, zeroq 72.9) beat an Lp clipping search, with or
        without correction, at 8-bit and at 4-bit activations. A trainable student gets no
        correction (``Toolchain.resolve_scheme``), so it keeps the clipping search.
        """
        out = self
        if out.bias_correction == "auto":
            out = replace(out, bias_correction=auto_bias_correction(out.weight_bits, out.act_bits))
        if out.weight_observer == "auto":
            out = replace(out, weight_observer=auto_weight_observer(out.weight_bits, out.corrects_biases))
        if out.act_observer == "auto":
            out = replace(out, act_observer=auto_act_observer(out.act_bits))
        if out.protocol == "B":
            out = replace(out, first_layer=out.first_layer or LayerBits(8, out.act_bits),
                          last_layer=out.last_layer or LayerBits(8, 8))
        if out.sensitive_8bit and out.weight_bits == 8:
            out = replace(out, sensitive_8bit=0)  # nothing to widen
        return out

    def for_training(self) -> QuantScheme:
        """The scheme a trainable student runs: it learns its biases, so ``auto`` bias correction is off
        (and ``auto`` weight ranges resolve as without it)."""
        return replace(self, bias_correction="off") if self.bias_correction == "auto" else self

    @property
    def corrects_biases(self) -> bool:
        """Whether post-training bias correction runs (either way of taking its expectations)."""
        return self.bias_correction in ("on", "bn")

    @property
    def quantizes_input(self) -> bool:
        """Whether the model's input image is quantized (the hardware protocol) or left in float (A, B)."""
        return self.protocol == "hardware"

    @property
    def name(self) -> str:
        """Names the resolved scheme: ``w4a4`` is MinMax on the hardware protocol (the figures recorded
        before observers were selectable), ``w4a4-wmse-protoA`` an MSE weight search under Protocol A."""
        r = self.resolved()
        base = f"w{r.weight_bits}a{r.act_bits}"
        extras = []
        if not self.weight_per_channel:
            extras.append("wpt")
        if not self.weight_symmetric:
            extras.append("wasym")
        if self.act_symmetric:
            extras.append("symact")
        if r.weight_observer != "minmax":
            extras.append(f"w{r.weight_observer}")
        if r.act_observer == "histogram":
            extras.append("ahist")
        if r.protocol != "hardware":
            extras.append(f"proto{r.protocol}")
        if r.corrects_biases:
            extras.append("bc" if r.bias_correction == "on" else "bcbn")
        implied = replace(self, first_layer=None, last_layer=None).resolved()  # what the protocol adds
        if r.first_layer and r.first_layer != implied.first_layer:
            extras.append(f"first{r.first_layer.weight_bits}{r.first_layer.act_bits}")
        if r.last_layer and r.last_layer != implied.last_layer:
            extras.append(f"last{r.last_layer.weight_bits}{r.last_layer.act_bits}")
        if r.sensitive_8bit:
            extras.append(f"top{r.sensitive_8bit}")
        return "-".join([base, *extras])

    @property
    def has_overrides(self) -> bool:
        return self.first_layer is not None or self.last_layer is not None or bool(self.sensitive_8bit)

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
        if "layer_bits" in d:
            d["layer_bits"] = tuple((str(n), b if isinstance(b, LayerBits) else LayerBits(**dict(b)))
                                    for n, b in d["layer_bits"])
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
        if not isinstance(value, str):
            raise TypeError(f"a scheme is a name such as 'w4a8', a table or a QuantScheme, got {type(value).__name__}")
        match = _NAME.match(value.strip().lower())
        tokens = [t for t in match.group(3).split("-") if t] if match else []
        top = [t for t in tokens if re.fullmatch(r"top\d+", t)]
        tokens = [t for t in tokens if t not in top]
        unknown = [t for t in tokens if t not in _TOKENS]
        if not match or unknown:
            raise ValueError(
                f"unknown scheme {value!r}: use 'w<bits>a<bits>' such as 'w8a8', 'w4a8', 'w4a4', with optional "
                f"suffixes {['-' + t for t in _TOKENS] + ['-top<N>']} (e.g. 'w4a4-protoA', 'w4a8-top3', 'w4a8-wminmax-aminmax' for plain "
                "MinMax), or a table with weight_bits/act_bits/weight_observer/act_observer/protocol"
            )
        fields = dict(_TOKENS[t] for t in tokens)
        if top:
            fields["sensitive_8bit"] = int(top[-1][3:])
        return cls(weight_bits=int(match.group(1)), act_bits=int(match.group(2)), **fields)


def auto_bias_correction(weight_bits: int, act_bits: int) -> str:
    """Post-training, below 8-bit weights: correction under the model's BatchNorm statistics ("bn").

    Measured (docs/lowbit.md): W4A8 ResNet-20 +3.3 points over MinMax alone, Lite0 +58, and "bn"
    makes the synthetic estimate as good as the real one (Lite0 zeroq 68.8 -> 72.9, real 73.0).
    At W4A4, MinMax weights with "bn" correction beat the Lp clipping search without it in every
    cell measured (ResNet-20 FX/PT2E x real/noise/intraq/zeroq x 2 seeds: +0.8 to +3.5; ResNet-56
    FX/PT2E x real/noise/intraq: +1.2 to +4.2). The earlier estimate on the images as they are,
    with the clipping search, cost 2 points there (ResNet-20 FX, real: 81.22 -> 79.29)."""
    del act_bits  # the same answer at every activation width measured
    return "bn" if weight_bits < 8 else "off"


def auto_weight_observer(weight_bits: int, bias_corrected: bool) -> str:
    """MinMax at 8 bits and under bias correction; below 8 bits without it, an Lp clipping search."""
    return "mse" if weight_bits < 8 and not bias_corrected else "minmax"


def auto_act_observer(act_bits: int) -> str:
    """The activation range estimator ``auto`` picks (measured, docs/lowbit.md): below 8 bits a
    histogram search (ResNet-20 W4A4 FX: +5 points on real data, +10 on noise); at 8 bits MinMax."""
    return "histogram" if act_bits < 8 else "minmax"


W8A8 = QuantScheme(8, 8)
W4A8 = QuantScheme(4, 8)
W4A4 = QuantScheme(4, 4)
