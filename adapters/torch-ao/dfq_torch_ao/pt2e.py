"""torchao PT2E: torch.export with a dynamic batch dim, an X86InductorQuantizer built from the scheme."""
from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfq_plugins.data import CalibrationSet
from dfq_plugins.errors import UntraceableModelError
from dfq_plugins.export_shapes import batch_dynamic_shapes
from dfq_plugins.logfilters import quiet_third_party_notices
from dfq_plugins.quant.biascorrect import pt2e_layers
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

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # CPU: skip noisy CUDA .so probing
quiet_third_party_notices()  # and torchao's line saying it skipped them


def _config(scheme: QuantScheme, wbits: int, abits: int, trainable: bool, reduce_range: bool = False):
    from torchao.quantization.pt2e import FakeQuantize
    from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec

    from dfq_plugins.quant.hostflags import with_host_flags

    aqmin, aqmax = scheme.act_range(abits)
    if reduce_range:  # one bit fewer for activations: u8 x s8 products then fit AVX2's 16-bit sums
        aqmin, aqmax = aqmin // 2, aqmax // 2
    wqmin, wqmax = scheme.weight_range(wbits)
    eps = {"eps": 2**-12}
    a_obs = activation_observer("pt2e", scheme.act_observer, trainable)
    w_obs = weight_observer("pt2e", scheme.weight_observer, scheme.weight_per_channel, trainable)
    if trainable:
        fake_quant = with_host_flags(FakeQuantize)  # its switches never make a GPU wait
        act_ctr = fake_quant.with_args(observer=a_obs, **eps)
        w_ctr = fake_quant.with_args(observer=w_obs, **eps)
    else:
        act_ctr = a_obs.with_args(**eps)
        w_ctr = w_obs.with_args(**eps)
    act = QuantizationSpec(
        dtype=torch.int8 if scheme.act_symmetric else torch.uint8, quant_min=aqmin, quant_max=aqmax,
        qscheme=torch.per_tensor_symmetric if scheme.act_symmetric else torch.per_tensor_affine,
        is_dynamic=False, observer_or_fake_quant_ctr=act_ctr,
    )
    if scheme.weight_per_channel:
        wq = torch.per_channel_symmetric if scheme.weight_symmetric else torch.per_channel_affine
    else:
        wq = torch.per_tensor_symmetric if scheme.weight_symmetric else torch.per_tensor_affine
    weight = QuantizationSpec(
        dtype=torch.int8, quant_min=wqmin, quant_max=wqmax, qscheme=wq,
        ch_axis=0 if scheme.weight_per_channel else None, is_dynamic=False, observer_or_fake_quant_ctr=w_ctr,
    )
    return QuantizationConfig(act, act, weight, None, trainable)


def quantizer_for(model: nn.Module, scheme: QuantScheme, trainable: bool = False, reduce_range: bool = False):
    """An X86InductorQuantizer whose global and first/last-layer configs follow the (resolved) scheme."""
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
    )

    scheme = scheme.resolved()
    q = X86InductorQuantizer()
    q.set_global(_config(scheme, scheme.weight_bits, scheme.act_bits, trainable, reduce_range))
    first, last = first_and_last_layers(model)
    for name, override in ((first, scheme.first_layer), (last, scheme.last_layer)):
        if override is not None:
            q.set_module_name_qconfig(name, _config(scheme, override.weight_bits, override.act_bits, trainable,
                                                    reduce_range))
    for name, override in scheme.layer_bits:  # the most sensitive layers (scheme.sensitive_8bit)
        q.set_module_name_qconfig(name, _config(scheme, override.weight_bits, override.act_bits, trainable,
                                                reduce_range))
    return q


def export_dynamic_batch(model: nn.Module, example_inputs: tuple) -> torch.fx.GraphModule:
    """``torch.export`` with dimension 0 of every input dynamic, so any batch size evaluates."""
    shapes = batch_dynamic_shapes(len(example_inputs))
    try:
        gm = torch.export.export(model, example_inputs, dynamic_shapes=shapes).module()
        if _layers_hidden_from_quantizer(gm):
            gm = torch.export.export(model, example_inputs, dynamic_shapes=shapes, strict=True).module()
    except Exception as exc:
        raise UntraceableModelError(
            f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: {exc}. "
            "Try toolchain nncf (eager hooks), or make forward export-friendly."
        ) from exc
    name_functional_activations(gm)
    return gm


_WEIGHTED_OPS = ("aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.linear")
# aten op -> the source the quantizer's fusion patterns know it by (torchao's equivalent types)
_ACTIVATION_SOURCES = {"aten.relu.": F.relu, "aten.relu_.": F.relu, "aten.hardtanh.": F.hardtanh,
                       "aten.hardtanh_.": F.hardtanh}


def _layers_hidden_from_quantizer(gm: torch.fx.GraphModule) -> bool:
    """True when the graph has conv/linear nodes that the quantizers' pattern matcher cannot see.

    X86InductorQuantizer finds layers with ``get_source_partitions``, which reads ``source_fn_stack``.
    A non-strict export (the default since torch 2.9) does not write it, and before 2.13 the matcher
    had no fallback: on torch 2.11 nothing was annotated and the "quantized" model stayed in float.
    A strict export (dynamo) writes it."""
    from torch.fx.passes.utils.source_matcher_utils import get_source_partitions

    layers = [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith(_WEIGHTED_OPS)]
    if not layers:
        return False
    found = get_source_partitions(gm.graph, [nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, F.conv1d, F.conv2d,
                                             F.conv3d, F.linear])
    return not any(found.values())


def name_functional_activations(gm: torch.fx.GraphModule) -> int:
    """Tell the quantizer where a ReLU written as a function came from; returns how many were named.

    The fusion patterns (conv-bn-relu, add-relu) find a ReLU by its source: an ``nn.ReLU`` module,
    or ``F.relu`` in ``source_fn_stack``, which only a strict export writes; ``torch.relu`` is
    not among the sources even then. An unseen ReLU is not fused, so the tensor before it is
    quantized, which wastes half of a 4-bit grid on negatives: a user-written ResNet-20 (``F.relu``)
    reached 86.37 at W4A4 with reconstruct, against 89.70 with the package's ``nn.ReLU``s.
    A node the matcher already sees keeps its metadata."""
    from torch.fx.passes.utils.source_matcher_utils import get_source_partitions

    seen = {n for parts in get_source_partitions(gm.graph, [nn.ReLU, nn.ReLU6, nn.Hardtanh, F.relu, F.relu_,
                                                            F.hardtanh, F.hardtanh_]).values()
            for p in parts for n in p.nodes}
    named = 0
    for node in gm.graph.nodes:
        source = next((fn for op, fn in _ACTIVATION_SOURCES.items() if str(node.target).startswith(op)), None)
        if node.op == "call_function" and source is not None and node not in seen:
            node.meta["source_fn_stack"] = [*node.meta.get("source_fn_stack", []), (node.name, source)]
            named += 1
    return named


def unannotated_layers(prepared: torch.fx.GraphModule) -> tuple[list[str], int]:
    """Conv/linear nodes whose weight got no observer, and how many such layers there are."""
    layers = [n for n in prepared.graph.nodes
              if n.op == "call_function" and str(n.target).startswith(_WEIGHTED_OPS)]
    missing = [n.name for n in layers
               if len(n.args) < 2 or "activation_post_process" not in str(getattr(n.args[1], "target", ""))]
    return missing, len(layers)


def report_unannotated(prepared: torch.fx.GraphModule) -> None:
    """Warn when the quantizer's pattern matching skipped layers: they would stay in float silently."""
    missing, total = unannotated_layers(prepared)
    if missing and len(missing) == total:
        raise UntraceableModelError(
            f"X86InductorQuantizer annotated none of the {total} conv/linear layers, so nothing would be quantized "
            f"(torch {torch.__version__}). Its patterns match nn.Conv2d/nn.Linear and their functional forms; use "
            "toolchain torch-ao-fx or nncf, or report this with your torch and torchao versions.")
    if missing:
        warnings.warn(
            f"X86InductorQuantizer left {len(missing)} of {total} conv/linear layers unquantized "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}). Its patterns match plain "
            "nn.Conv2d/nn.Linear; a subclass or functional call with a custom forward is not recognised.",
            stacklevel=3,
        )


class PT2EToolchain(Toolchain):
    """torchao PT2E. ``observer`` (``minmax`` or ``histogram``, X86InductorQuantizer's own default)
    overrides the scheme's ``act_observer``; by default the scheme decides.

    ``reduce_range=True`` gives activations one bit less (u8 0..127), as torch.ao's fbgemm
    configs did: on CPUs without VNNI (AVX2 only) x86 Inductor's int8 convolutions sum u8 x s8
    products in 16 bits, which saturate with full-range activations (Lite0 W8A8 lost 3.8 points
    there; docs/deploy.md). Off by default: VNNI and AMX CPUs do not need it."""

    name = "torchao-pt2e"

    def __init__(self, observer: str | None = None, input_range: str = "data", reduce_range: bool = False) -> None:
        if observer not in (None, "minmax", "histogram"):
            raise ValueError(f"observer must be 'minmax' or 'histogram', got {observer!r}")
        if input_range not in INPUT_RANGES:
            raise ValueError(f"input_range must be one of {INPUT_RANGES}, got {input_range!r}")
        self.observer = observer
        self.input_range = input_range
        self.reduce_range = reduce_range

    def prepare(self, model: nn.Module, scheme: QuantScheme, example_inputs: tuple, *,
                trainable: bool = False) -> Any:
        from torchao.quantization.pt2e.quantize_pt2e import (
            prepare_pt2e,
            prepare_qat_pt2e,
        )

        self.check_scheme(scheme)
        scheme = self.resolve_scheme(scheme, trainable)
        m = private_copy(model, trainable)
        if self.observer is not None:
            scheme = dataclasses.replace(scheme, act_observer=self.observer)
        quantizer = quantizer_for(m, scheme, trainable, self.reduce_range)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = export_dynamic_batch(m, example_inputs)
            prepared = prepare_qat_pt2e(gm, quantizer) if trainable else prepare_pt2e(gm, quantizer)
        report_unannotated(prepared)
        prepared._dfq_protocol = apply_protocol(prepared, scheme.protocol, scheme.act_range(8))
        prepared._dfq_student_act_histogram = trainable and scheme.act_observer == "histogram"
        if trainable:
            for p in prepared.parameters():
                if p.is_floating_point():
                    p.requires_grad_(True)
        return prepared

    def calibrate(self, prepared: Any, calibration_set: CalibrationSet) -> Any:
        from torchao.quantization.pt2e import move_exported_model_to_eval

        move_exported_model_to_eval(prepared)
        run_calibration(prepared, calibration_set)
        if histogram_ranges_wanted(prepared):
            calibrate_activations_by_histogram(prepared, calibration_set, "pt2e")
        if self.input_range == "spec":
            pin_input_observers(prepared, *input_bounds_of(calibration_set))
        return prepared

    def student_eval(self, student: Any) -> Any:
        """An exported graph cannot ``.eval()``; torchao swaps its BN/dropout ops instead."""
        from torchao.quantization.pt2e import move_exported_model_to_eval

        move_exported_model_to_eval(student)
        return student

    def student_train(self, student: Any) -> Any:
        from torchao.quantization.pt2e import move_exported_model_to_train

        move_exported_model_to_train(student)
        return student

    def bias_correction_layers(self, prepared: Any) -> list[Any]:
        return pt2e_layers(prepared)

    def student_bias_correction_layers(self, student: Any) -> list[Any]:
        return pt2e_layers(student)

    def student_ranges(self, scheme: QuantScheme) -> str:
        """A histogram-observed scheme's student starts from the histogram search (``studentranges``)."""
        act = self.observer if self.observer is not None else self.resolve_scheme(scheme, True).act_observer
        return "histogram" if act == "histogram" else "observer"

    def make_ranges_learnable(self, student: Any) -> list[nn.Parameter]:
        """Swap the calibrated fake-quants for the toolchain's learnable ones (LSQ), weights and activations."""
        return make_ranges_learnable(student, "pt2e")

    def convert(self, prepared: Any) -> nn.Module:
        """The deployable model; the student stays usable (torchao's convert would consume it).

        ``.eval()``/``.train()`` work on it (torchao's ``allow_exported_model_train_eval``), so
        ordinary evaluation loops and ONNX export do not stop on an exported graph's NotImplementedError."""
        from torchao.quantization.pt2e import allow_exported_model_train_eval, move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = convert_pt2e(copy.deepcopy(prepared))  # convert_pt2e rewrites its argument in place
        move_exported_model_to_eval(converted)
        allow_exported_model_train_eval(converted)
        return converted
