"""NNCF post-training quantization (Torch backend) driven by a CalibrationSet."""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from dfq_plugins.data import CalibrationSet
from dfq_plugins.device import module_device
from dfq_plugins.errors import UnsupportedSchemeError
from dfq_plugins.scheme import QuantScheme
from dfq_plugins.toolchain import Toolchain, private_copy

from .biascorrect import correct_biases_under_bn
from .ranges import (
    layers_without_weight_quantizer,
    remove_input_quantizers,
    search_weight_scales,
)


def configure_extension_build() -> None:
    """NNCF JIT-builds a C++ extension (~60 s on 2 cores, past its 60 s default timeout), into our
    cache (``DFQ_CACHE``) unless the user set ``TORCH_EXTENSIONS_DIR``."""
    from dfq_plugins.io import cache_root

    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_root() / "torch_extensions"))


class _CallWrapper(nn.Module):
    """NNCF adds a ``__nncf_hooks`` child; ``nn.Sequential.forward`` would call it as a layer."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


def needs_wrapping(model: nn.Module) -> bool:
    return isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def advanced_parameters_for(scheme: QuantScheme, **overrides: Any) -> Any:
    """``AdvancedQuantizationParameters`` carrying the scheme's bits, modes and granularity."""
    from nncf import AdvancedQuantizationParameters
    from nncf.common.quantization.structs import QuantizationScheme as QuantizationMode
    from nncf.quantization.advanced_parameters import QuantizationParameters

    sym, asym = QuantizationMode.SYMMETRIC, QuantizationMode.ASYMMETRIC
    weights = QuantizationParameters(num_bits=scheme.weight_bits, mode=sym if scheme.weight_symmetric else asym,
                                     per_channel=scheme.weight_per_channel)
    acts = QuantizationParameters(num_bits=scheme.act_bits, mode=sym if scheme.act_symmetric else asym,
                                  per_channel=False)
    return AdvancedQuantizationParameters(weights_quantization_params=weights,
                                          activations_quantization_params=acts, **overrides)


# Ops whose inputs NNCF's NPU hardware config only quantizes at 8 bits: below 8-bit activations
# their input quantizer is left out (the op runs on what the previous quantizer produced).
EIGHT_BIT_ONLY_OPS = ("adaptive_avg_pool2d", "avg_pool2d")


def with_pooling_ignored(ignored_scope: Any = None) -> Any:
    """The user's ignored scope plus the pooling ops NNCF cannot quantize below 8 bits."""
    import nncf

    if ignored_scope is None:
        return nncf.IgnoredScope(types=list(EIGHT_BIT_ONLY_OPS), validate=False)
    types = list(dict.fromkeys([*ignored_scope.types, *EIGHT_BIT_ONLY_OPS]))
    return nncf.IgnoredScope(names=ignored_scope.names, patterns=ignored_scope.patterns, types=types,
                             subgraphs=ignored_scope.subgraphs, validate=False)


_RANGE_NAMES = ("_scale_param_storage", "_input_low", "_input_range_param_storage", "input_low", "input_range")


def _is_nncf_state(name: str) -> bool:
    return "__nncf_hooks" in name or "_nncf" in name


@dataclass
class _Pending:
    model: nn.Module
    scheme: QuantScheme
    trainable: bool
    kwargs: dict[str, Any] = field(default_factory=dict)
    float_model: nn.Module | None = None  # for bias correction under BN statistics


OVERFLOW_FIX = ("enable", "first_layer_only", "disable")  # nncf's OverflowFix values


class NNCFToolchain(Toolchain):
    """``nncf.quantize`` on the Torch backend. Extra keyword arguments go to ``nncf.quantize``
    (``preset``, ``fast_bias_correction``, ``ignored_scope``, ...).

    ``overflow_fix`` (``"first_layer_only"``, NNCF's default; ``"enable"``; ``"disable"``) sets
    NNCF's fix for int8 kernels that saturate on CPUs without VNNI (AVX2 only): with ``"enable"``
    every layer's weights keep to 7 bits, so the deployed model scores what the fake-quant model
    scores there. On Lite0 W8A8 the first-layer-only default lost 1.2 points under OpenVINO on an
    AVX2 CPU (docs/deploy.md)."""

    name = "nncf"

    def __init__(self, overflow_fix: str | None = None, **quantize_kwargs: Any) -> None:
        if overflow_fix is not None and overflow_fix not in OVERFLOW_FIX:
            raise ValueError(f"nncf overflow_fix={overflow_fix!r}; choose one of {OVERFLOW_FIX} (or leave it unset "
                             "for NNCF's default, first_layer_only)")
        self.overflow_fix = overflow_fix
        self.quantize_kwargs = quantize_kwargs

    def check_scheme(self, scheme: QuantScheme) -> None:
        if scheme.act_bits not in (4, 8) or scheme.weight_bits not in (2, 4, 8):
            raise UnsupportedSchemeError(
                f"NNCF's hardware configs offer 8/4-bit activations and 8/4/2-bit weights, not {scheme.name}"
            )
        if scheme.weight_bits < 8 and not scheme.weight_symmetric:
            raise UnsupportedSchemeError("NNCF offers only symmetric weights below 8 bits; set weight_symmetric=true")
        if scheme.act_bits < 8 and not scheme.act_symmetric:
            raise UnsupportedSchemeError(
                f"NNCF offers only symmetric activations below 8 bits (its NPU config), but {scheme.name} asks for "
                "affine ones. Use the scheme with act_symmetric=true (e.g. 'w4a4-symact': unsigned after ReLU, "
                "so the same grid for ReLU outputs), or toolchain torch-ao-fx / torchao-pt2e"
            )
        if scheme.bias_correction == "on":
            raise UnsupportedSchemeError(
                "nncf.quantize corrects biases on the images itself (its fast_bias_correction); use '-bcbn' "
                "for the correction under BatchNorm statistics (the default below 8-bit weights), or drop '-bc'"
            )
        if scheme.protocol == "B":
            raise UnsupportedSchemeError(
                "nncf.quantize cannot put the first layer at W8 and the last at W8A8 (Protocol B) while the rest "
                "is at lower bits; use protocol A with nncf, or toolchain torch-ao-fx / torchao-pt2e for B"
            )
        if scheme.resolved().sensitive_8bit:
            raise UnsupportedSchemeError(
                f"{scheme.name}: nncf.quantize gives every layer the same weight bits, so it cannot keep the most "
                "sensitive layers at 8 bits; use toolchain torchao-pt2e or torch-ao-fx, or list those layers in "
                "ignored_scope to leave them in float")
        if scheme.has_overrides:
            raise UnsupportedSchemeError(
                "nncf.quantize cannot give the first/last layer other bit-widths than the rest; use "
                "toolchain torch-ao-fx or torchao-pt2e, or keep them at the scheme's bits "
                "(or exclude them with ignored_scope to leave them in float)"
            )

    def resolve_scheme(self, scheme: QuantScheme, trainable: bool = False) -> QuantScheme:
        """``auto`` is NNCF's own MinMax for weights and activations: its bias correction is fitted to
        MinMax weights, and a scale search after it cost 1.1 points at W4A8 (ResNet-20, real data).

        Bias correction: at 8-bit weights ``nncf.quantize``'s own (``fast_bias_correction``) is enough
        and ``auto`` is off. Below 8 bits ``auto`` is the correction under BatchNorm statistics
        (``-bcbn``, ``biascorrect.py``) in place of NNCF's, which left EfficientNet-Lite0 W4A8 at 8.8%,
        after an Lp search of the weight scales (real images, val1300: 71.6, MinMax 69.0; PT2E 72.9).
        A trainable student learns its biases: off.
        """
        correction = scheme.bias_correction
        if correction == "auto":
            correction = "bn" if scheme.weight_bits < 8 and not trainable else "off"
        # with the correction computed after it, the weights' Lp scale search helps: Lite0 W4A8 69.0 -> 71.6
        weights = ("mse" if correction == "bn" else "minmax") if scheme.weight_observer == "auto" \
            else scheme.weight_observer
        return dataclasses.replace(
            scheme, weight_observer=weights,
            act_observer="minmax" if scheme.act_observer == "auto" else scheme.act_observer,
            bias_correction=correction).resolved()

    def check_bias_correction(self, scheme: QuantScheme, trainable: bool) -> None:
        if scheme.bias_correction == "on":
            self.check_scheme(scheme)
        if scheme.corrects_biases and trainable:
            super().check_bias_correction(scheme, trainable)

    def prepare(self, model: nn.Module, scheme: QuantScheme, example_inputs: tuple, *,
                trainable: bool = False) -> _Pending:
        self.check_scheme(scheme)
        scheme = self.resolve_scheme(scheme, trainable)
        m = private_copy(model, trainable=False)
        reference = private_copy(model, trainable=False) if scheme.bias_correction == "bn" else None
        if needs_wrapping(m):
            m = _CallWrapper(m)
        return _Pending(m, scheme, trainable, dict(self.quantize_kwargs), reference)

    def calibrate(self, prepared: _Pending, calibration_set: CalibrationSet) -> nn.Module:
        configure_extension_build()
        import nncf

        kwargs = dict(prepared.kwargs)
        kwargs.setdefault("subset_size", len(calibration_set))
        ours = prepared.scheme.bias_correction == "bn" and "advanced_parameters" not in prepared.kwargs
        kwargs.setdefault("advanced_parameters", advanced_parameters_for(prepared.scheme,
                                                                         disable_bias_correction=ours))
        if self.overflow_fix is not None:
            from nncf.quantization.advanced_parameters import OverflowFix

            kwargs["advanced_parameters"].overflow_fix = OverflowFix(self.overflow_fix)
        if prepared.scheme.act_observer == "histogram" and "advanced_parameters" not in prepared.kwargs:
            from nncf.quantization.range_estimator import RangeEstimatorParametersSet

            kwargs["advanced_parameters"].activations_range_estimator_params = RangeEstimatorParametersSet.HISTOGRAM
        if min(prepared.scheme.weight_bits, prepared.scheme.act_bits) < 8:
            kwargs.setdefault("target_device", nncf.TargetDevice.NPU)  # the HW config that allows 4-bit
        if prepared.scheme.act_bits < 8:
            kwargs["ignored_scope"] = with_pooling_ignored(kwargs.get("ignored_scope"))
        try:
            quantized = nncf.quantize(prepared.model, calibration_set.as_nncf(module_device(prepared.model)), **kwargs)
        except ValueError as exc:
            if "incompatible" not in str(exc):
                raise
            raise UnsupportedSchemeError(
                f"NNCF cannot place {prepared.scheme.name} on this model: {' '.join(str(exc).split())}. "
                "Some operations (pooling, element-wise) only have 8-bit activations in NNCF's hardware "
                "configs; exclude them with ignored_scope, or use toolchain torch-ao-fx / torchao-pt2e"
            ) from exc
        missing = [n.removeprefix("inner.") for n in layers_without_weight_quantizer(quantized)]
        if missing and "ignored_scope" not in prepared.kwargs:
            warnings.warn(
                f"nncf.quantize left {len(missing)} conv/linear layer(s) without weight quantization: "
                f"{', '.join(missing)}. NNCF quantizes what its trace of the calibration data reached; a "
                "data-dependent branch the data never took stays in float, and activation ranges after it "
                "were fitted to the other path. Make the branch static, or list those layers in the NNCF "
                "toolchain's ignored_scope to keep them in float on purpose", stacklevel=2)
        if prepared.scheme.weight_observer == "mse":
            search_weight_scales(quantized)
        if prepared.float_model is not None:  # after the weight scales are final
            correct_biases_under_bn(quantized, prepared.float_model, calibration_set)
            prepared.float_model = None
        if prepared.scheme.protocol == "A":
            remove_input_quantizers(quantized)
        if prepared.trainable:
            quantized.train()
            for name, p in quantized.named_parameters():  # the model's own weights; NNCF's quantizer
                if p.is_floating_point() and not _is_nncf_state(name):  # scales keep NNCF's setting
                    p.requires_grad_(True)
        return quantized

    def range_parameters(self, student: Any) -> list[nn.Parameter]:
        """NNCF's quantizer scales/ranges: learnable parameters (LSQ-style) in its Torch backend."""
        return [p for name, p in student.named_parameters()
                if _is_nncf_state(name) and p.is_floating_point() and name.rsplit(".", 1)[-1] in _RANGE_NAMES]

    def convert(self, prepared: nn.Module) -> nn.Module:
        """NNCF's quantized Torch model is already its deployable form (fake-quant, exportable)."""
        return prepared.eval()
