"""torch.ao FX graph-mode quantization (prepare_fx / prepare_qat_fx / convert_fx)."""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from dfq_plugins.data import CalibrationSet
from dfq_plugins.errors import UntraceableModelError
from dfq_plugins.quant.biascorrect import fx_layers, fx_qat_layers
from dfq_plugins.quant.learnable import make_ranges_learnable
from dfq_plugins.quant.protocols import apply_protocol
from dfq_plugins.scheme import QuantScheme
from dfq_plugins.toolchain import (
    INPUT_RANGES,
    Toolchain,
    first_and_last_layers,
    input_bounds_of,
    pin_input_observers,
    private_copy,
    run_calibration,
)

from .observers import activation_observer, weight_observer
from .studentranges import calibrate_activations_by_histogram, histogram_ranges_wanted

TRACEABLE_ELSEWHERE = "torchao-pt2e (torch.export) and nncf"


def untraceable_advice(model_name: str, exc: Exception) -> str:
    """What to do when FX cannot trace: a data-dependent branch defeats every toolchain here
    (torch.export refuses it, NNCF quantizes only the path its data took), other trace errors not."""
    if "control flow" in str(exc):
        return (f"torch.ao FX cannot trace {model_name}: its forward branches on tensor values ({exc}). No "
                "toolchain here quantizes such a model correctly: torchao-pt2e's torch.export refuses it, and nncf "
                "quantizes only the branch its calibration data took (it warns, listing the layers left in float). "
                "Make the branch static (decide it outside forward, or use torch.cond) and quantize again")
    return (f"torch.ao FX cannot symbolically trace {model_name} ({exc}). Use toolchain {TRACEABLE_ELSEWHERE}, "
            "which capture graphs differently")


def _qconfig(scheme: QuantScheme, wbits: int, abits: int, trainable: bool):
    """MinMax or MSE-searched weights, MinMax or histogram activations, narrowed ranges below 8 bits."""
    from torch.ao.quantization import QConfig
    from torch.ao.quantization.fake_quantize import FakeQuantize

    from dfq_plugins.quant.hostflags import with_host_flags

    aqmin, aqmax = scheme.act_range(abits)
    wqmin, wqmax = scheme.weight_range(wbits)
    act_kw = dict(
        dtype=torch.qint8 if scheme.act_symmetric else torch.quint8,
        qscheme=torch.per_tensor_symmetric if scheme.act_symmetric else torch.per_tensor_affine,
        quant_min=aqmin, quant_max=aqmax,
    )
    w_obs = weight_observer("fx", scheme.weight_observer, scheme.weight_per_channel, trainable)
    a_obs = activation_observer("fx", scheme.act_observer, trainable)
    if scheme.weight_per_channel:
        wq = torch.per_channel_symmetric if scheme.weight_symmetric else torch.per_channel_affine
        w_kw = dict(dtype=torch.qint8, qscheme=wq, quant_min=wqmin, quant_max=wqmax, ch_axis=0)
    else:
        wq = torch.per_tensor_symmetric if scheme.weight_symmetric else torch.per_tensor_affine
        w_kw = dict(dtype=torch.qint8, qscheme=wq, quant_min=wqmin, quant_max=wqmax)
    if trainable:
        fake_quant = with_host_flags(FakeQuantize)  # its switches never make a GPU wait
        return QConfig(
            activation=fake_quant.with_args(observer=a_obs, **act_kw),
            weight=fake_quant.with_args(observer=w_obs, **w_kw),
        )
    return QConfig(activation=a_obs.with_args(**act_kw), weight=w_obs.with_args(**w_kw))


def qconfig_mapping_for(model: nn.Module, scheme: QuantScheme, trainable: bool = False):
    """A QConfigMapping from the (resolved) scheme, with its first/last-layer overrides."""
    from torch.ao.quantization import QConfigMapping

    scheme = scheme.resolved()
    mapping = QConfigMapping().set_global(_qconfig(scheme, scheme.weight_bits, scheme.act_bits, trainable))
    first, last = first_and_last_layers(model)
    for name, override in ((first, scheme.first_layer), (last, scheme.last_layer)):
        if override is not None:
            mapping.set_module_name(name, _qconfig(scheme, override.weight_bits, override.act_bits, trainable))
    for name, override in scheme.layer_bits:  # the most sensitive layers (scheme.sensitive_8bit)
        mapping.set_module_name(name, _qconfig(scheme, override.weight_bits, override.act_bits, trainable))
    return mapping


class FxToolchain(Toolchain):
    """torch.ao FX: symbolic tracing, observers from the scheme, fbgemm/x86 int8 kernels."""

    name = "torch-ao-fx"

    def __init__(self, input_range: str = "data") -> None:
        """``input_range="spec"`` sets the input quantizer to the InputSpec's valid pixel range
        instead of the range the calibration images happen to cover."""
        if input_range not in INPUT_RANGES:
            raise ValueError(f"input_range must be one of {INPUT_RANGES}, got {input_range!r}")
        self.input_range = input_range

    def prepare(self, model: nn.Module, scheme: QuantScheme, example_inputs: tuple, *,
                trainable: bool = False) -> Any:
        from torch.ao.quantization.quantize_fx import prepare_fx, prepare_qat_fx

        self.check_scheme(scheme)
        scheme = self.resolve_scheme(scheme, trainable)
        m = private_copy(model, trainable)
        mapping = qconfig_mapping_for(m, scheme, trainable)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                prepare = prepare_qat_fx if trainable else prepare_fx
                prepared = prepare(m, mapping, example_inputs)
            except torch.fx.proxy.TraceError as exc:
                raise UntraceableModelError(untraceable_advice(type(model).__name__, exc)) from exc
        prepared._dfq_protocol = apply_protocol(prepared, scheme.protocol, scheme.act_range(8))
        bits = [scheme.weight_bits, scheme.act_bits]
        for override in (scheme.first_layer, scheme.last_layer):
            if override is not None:
                bits += [override.weight_bits, override.act_bits]
        prepared._dfq_narrow_bits = min(bits) < 8
        prepared._dfq_student_act_histogram = trainable and scheme.act_observer == "histogram"
        return prepared

    def calibrate(self, prepared: Any, calibration_set: CalibrationSet) -> Any:
        was_training = prepared.training
        prepared.eval()
        run_calibration(prepared, calibration_set)
        if histogram_ranges_wanted(prepared):
            calibrate_activations_by_histogram(prepared, calibration_set, "fx")
        if self.input_range == "spec":
            pin_input_observers(prepared, *input_bounds_of(calibration_set))
        prepared.train(was_training)
        return prepared

    def bias_correction_layers(self, prepared: Any) -> list[Any]:
        return fx_layers(prepared)

    def student_bias_correction_layers(self, student: Any) -> list[Any]:
        return fx_qat_layers(student)

    def student_ranges(self, scheme: QuantScheme) -> str:
        """A histogram-observed scheme's student starts from the histogram search (``studentranges``)."""
        return "histogram" if self.resolve_scheme(scheme, True).act_observer == "histogram" else "observer"

    def make_ranges_learnable(self, student: Any) -> list[nn.Parameter]:
        """Swap the calibrated fake-quants for the toolchain's learnable ones (LSQ), weights and activations."""
        return make_ranges_learnable(student, "fx")

    def convert(self, prepared: Any) -> nn.Module:
        """``convert_fx`` (int8 kernels) at 8 bits; below 8 bits the decomposed reference model.

        The int8 kernels saturate to the int8/uint8 range, not to a narrowed ``quant_min/quant_max``,
        so a 4-bit scheme converted with ``convert_fx`` silently keeps values beyond 16 levels. The
        decomposed reference model clamps to the scheme's range and is what 4 bits really give.
        """
        from torch.ao.quantization.quantize_fx import (
            _convert_to_reference_decomposed_fx,
            convert_fx,
        )

        narrow = getattr(prepared, "_dfq_narrow_bits", True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if narrow:
                return _convert_to_reference_decomposed_fx(prepared.eval())
            return convert_fx(prepared.eval())
