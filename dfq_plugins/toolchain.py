"""The toolchain contract adapters implement, and helpers they share."""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .data import CalibrationSet
from .errors import UnsupportedSchemeError
from .scheme import QuantScheme

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class Toolchain:
    """prepare -> calibrate -> convert, the way the wrapped toolchain does it.

    ``prepare`` never touches the caller's model (it quantizes a deep copy) and with
    ``trainable=True`` returns a student whose weights require gradients (QAT-style fake
    quantization), for the distillers. ``convert`` returns the toolchain's own model.
    """

    name: str = "toolchain"

    def check_scheme(self, scheme: QuantScheme) -> None:
        """Raise UnsupportedSchemeError for a scheme this toolchain cannot express."""

    def resolve_scheme(self, scheme: QuantScheme, trainable: bool = False) -> QuantScheme:
        """The scheme this toolchain will really run (``auto`` observers chosen); records name it.

        A trainable student gets no bias correction (it learns its biases), so ``auto`` resolves
        as without it there, weights included.
        """
        return (scheme.for_training() if trainable else scheme).resolved()

    def student_ranges(self, scheme: QuantScheme) -> str:
        """How a trainable student's activation ranges start: ``"observer"`` (its own training
        observers over the calibration set) or another search this toolchain runs after them
        (``"histogram"``); distillation caches and bench records key on it."""
        return "observer"

    def bias_correction_layers(self, prepared: Any) -> list[Any] | None:
        """The prepared model's weighted layers for bias correction (``quant/biascorrect.py``);
        None where this toolchain has no such hook (its scheme then refuses ``-bc``)."""
        return None

    def student_bias_correction_layers(self, student: Any) -> list[Any] | None:
        """A trainable student's weighted layers whose bias absorbs a mean output shift in eval mode
        (``reconstruct`` corrects them before it trains); None where this toolchain cannot say."""
        return None

    def check_bias_correction(self, scheme: QuantScheme, trainable: bool) -> None:
        """Refuse an explicit ``-bc``/``-bcbn`` this toolchain or a trainable student cannot honour."""
        if not scheme.corrects_biases:
            return
        if trainable:
            raise UnsupportedSchemeError(
                f"{scheme.name}: bias correction is post-training; a trainable student learns its biases. "
                "Drop '-bc' (or set bias_correction='auto') to fine-tune")
        if type(self).bias_correction_layers is Toolchain.bias_correction_layers:
            raise UnsupportedSchemeError(f"{self.name} has no bias correction hook here; drop '-bc'")

    def prepare(self, model: nn.Module, scheme: QuantScheme, example_inputs: tuple, *,
                trainable: bool = False) -> Any:
        raise NotImplementedError

    def calibrate(self, prepared: Any, calibration_set: CalibrationSet) -> Any:
        raise NotImplementedError

    def convert(self, prepared: Any) -> nn.Module:
        raise NotImplementedError

    # -- what the distillers need from a trainable student -----------------------------------
    def student_eval(self, student: Any) -> Any:
        """Fine-tuning mode of the GDFQ family: BN on running statistics, fake-quant still active."""
        return student.eval()

    def student_train(self, student: Any) -> Any:
        """Training mode: BN normalises with batch statistics and updates its running ones."""
        return student.train()

    def set_observers(self, student: Any, enabled: bool) -> int:
        """Switch the activation range observers on or off (weights keep tracking); returns how many."""
        count = 0
        for name, module in activation_fake_quants(student):
            (module.enable_observer if enabled else module.disable_observer)()
            count += 1
        return count

    def reset_observers(self, student: Any) -> int:
        """Forget the calibrated activation ranges, so the next observed batches set them afresh."""
        count = 0
        for _, module in activation_fake_quants(student):
            observer = getattr(module, "activation_post_process", None)
            if observer is not None and hasattr(observer, "reset_min_max_vals"):
                scale = getattr(module, "scale", None)
                observer.reset_min_max_vals()
                if isinstance(scale, torch.Tensor):  # torchao's per-channel reset makes its empty ranges on the CPU
                    observer.to(scale.device)
                count += 1
        return count

    @contextlib.contextmanager
    def measuring(self, student: Any) -> Iterator[Any]:
        """Evaluate a student without moving its ranges: eval mode, every observer off, both
        restored after. An observer left on while evaluating would fit the ranges to the test set."""
        training = student.training
        switched = [m for m in student.modules() if _observing(m)]
        self.student_eval(student)
        for m in switched:
            m.disable_observer()
        try:
            yield student
        finally:
            for m in switched:
                m.enable_observer()
            if training:
                self.student_train(student)

    def freeze_ranges(self, student: Any) -> Any:
        """Eval mode with every observer off for good: a student used as a finished model."""
        self.student_eval(student)
        for m in student.modules():
            if _observing(m):
                m.disable_observer()
        return student

    def range_parameters(self, student: Any) -> list[nn.Parameter]:
        """Quantizer ranges that are trainable parameters (NNCF's scales, learnable fake-quants)."""
        from .quant.learnable import learned_range_parameters

        return learned_range_parameters(student)

    def make_ranges_learnable(self, student: Any) -> list[nn.Parameter]:
        """Turn the calibrated student's ranges into parameters (LSQ) and return them; a toolchain
        whose ranges are parameters already returns those."""
        return self.range_parameters(student)

    def quantize(self, model: nn.Module, scheme: QuantScheme, calibration_set: CalibrationSet, *,
                 trainable: bool = False) -> nn.Module:
        from .device import module_device, to_device

        example = to_device(example_inputs_of(calibration_set), module_device(model))
        scheme = with_sensitive_layers(model, scheme, calibration_set)
        ran = self.resolve_scheme(scheme, trainable)
        self.check_bias_correction(ran, trainable)
        prepared = self.prepare(model, scheme, example, trainable=trainable)
        prepared = self.calibrate(prepared, calibration_set)
        if trainable:  # a student to fine-tune, not an artefact: quantize() stamps what convert() returns
            return prepared
        if ran.corrects_biases:
            from .quant.biascorrect import correct_biases

            correct_biases(prepared, self.bias_correction_layers(prepared), calibration_set,
                           standardize_with=model if ran.bias_correction == "bn" else None)
        return stamp(self.convert(prepared), self, ran, calibration_set)


SENSITIVITY_IMAGES = 64


def with_sensitive_layers(model: nn.Module, scheme: QuantScheme, calibration_set: CalibrationSet) -> QuantScheme:
    """``scheme`` with ``layer_bits`` naming its ``sensitive_8bit`` most sensitive layers (8-bit weights),
    measured on the first calibration images; unchanged when it asks for none or names them already."""
    if not scheme.resolved().sensitive_8bit or scheme.layer_bits:
        return scheme
    import dataclasses
    import logging

    from .device import module_device
    from .quant.sensitivity import most_sensitive_layers
    from .scheme import LayerBits

    images = calibration_set.images[:SENSITIVITY_IMAGES].float().to(module_device(model))
    names = most_sensitive_layers(model, images, scheme.weight_bits, scheme.sensitive_8bit)
    logging.getLogger("dfq").info("8-bit weights for the %d most sensitive layers: %s", len(names), ", ".join(names))
    return dataclasses.replace(scheme, layer_bits=tuple((n, LayerBits(8, scheme.act_bits)) for n in names))


def stamp(model: Any, toolchain: Toolchain, scheme: QuantScheme, calibration_set: CalibrationSet,
          distill: str | None = None) -> Any:
    """Record on a quantized model how it was made (``export`` writes it into the sidecar)."""
    m = calibration_set.manifest
    info = {"toolchain": toolchain.name, "scheme": scheme.name, "source": m.get("method"),
            "calibration_images": calibration_set.num_samples, "calibration_seed": m.get("seed"),
            "calibration_hash": calibration_set.content_hash()[:16]}
    if m.get("input_spec") is not None:
        info["input_spec"] = m["input_spec"]
    if distill is not None:
        info["distill"] = distill
    try:
        model._dfq_info = info
    except (AttributeError, TypeError):  # a model type that takes no attributes: export asks for the spec
        pass
    return model


def _observing(module: nn.Module) -> bool:
    """A torch.ao/torchao fake-quant module whose observer is currently on."""
    from .quant.learnable import observer_is_on

    return observer_is_on(module)


def _weight_fake_quant_names(student: Any) -> set[str]:
    """Names of fake-quant modules that read a weight (FX QAT modules, or get_attr inputs in a graph)."""
    names = {n for n, _ in student.named_modules() if n.endswith("weight_fake_quant")}
    graph = getattr(student, "graph", None)
    if graph is not None:
        for node in graph.nodes:
            if node.op == "call_module" and node.args and getattr(node.args[0], "op", None) == "get_attr":
                names.add(str(node.target))
    return names


def activation_fake_quants(student: Any) -> list[tuple[str, nn.Module]]:
    """The fake-quant modules that quantize activations (those with observer switches)."""
    weights = _weight_fake_quant_names(student)
    return [(n, m) for n, m in student.named_modules()
            if hasattr(m, "enable_observer") and hasattr(m, "disable_observer") and n not in weights]


def example_inputs_of(cs: CalibrationSet) -> tuple:
    """Positional example inputs (batch of at least 2, so a dynamic batch dim stays dynamic)."""
    batch = cs[0]
    if isinstance(batch, dict):
        raise TypeError("keyword-input models need explicit example_inputs")
    batch = batch if isinstance(batch, tuple) else (batch,)
    return tuple(t[:2] if t.shape[0] >= 2 else torch.cat([t, t]) for t in batch)


def private_copy(model: nn.Module, trainable: bool) -> nn.Module:
    """A deep copy in the right mode, so the caller's (teacher's) model is never modified."""
    m = copy.deepcopy(model)
    for p in m.parameters():
        if p.is_floating_point():
            p.requires_grad_(trainable)
    return m.train() if trainable else m.eval()


def first_and_last_layers(model: nn.Module) -> tuple[str, str]:
    names = [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]
    if not names:
        raise ValueError("the model has no Conv or Linear layer to quantize")
    return names[0], names[-1]


@torch.no_grad()
def run_calibration(model: Any, calibration_set: CalibrationSet) -> None:
    """Feed every batch through an observed model (tensor, tuple or dict batches), on its device."""
    from .device import module_device, to_device

    device = module_device(model)
    for batch in calibration_set:
        batch = to_device(batch, device)
        if isinstance(batch, dict):
            model(**batch)
        elif isinstance(batch, tuple):
            model(*batch)
        else:
            model(batch)


INPUT_RANGES = ("data", "spec")


def input_bounds_of(calibration_set: CalibrationSet) -> tuple[float, float]:
    """The valid normalised input range (per-tensor) from the set's InputSpec."""
    from .spec import InputSpec

    spec = calibration_set.manifest.get("input_spec")
    if spec is None:
        raise ValueError("input_range='spec' needs the model's InputSpec, and this calibration set carries none; "
                         "synthesize it with dfq_plugins.synthesize(..., input_spec=...) or use input_range='data'")
    lo, hi = InputSpec.from_dict(spec).bounds()
    return float(lo.min()), float(hi.max())


@torch.no_grad()
def pin_input_observers(graph_module: nn.Module, low: float, high: float) -> int:
    """Set the range of every observer that reads a graph input to [low, high]; returns how many.

    In data-free calibration the model's input range is known exactly (the InputSpec's valid
    pixels), while synthetic images may not reach it: Genie's span [-1.52, 0.95] of [-2.12, 2.64]
    on ResNet-20, and an 8-bit input quantizer calibrated on them clips real images.
    """
    graph = getattr(graph_module, "graph", None)
    if graph is None:
        raise TypeError("input_range='spec' needs a GraphModule (FX or PT2E)")
    pinned = 0
    for node in graph.nodes:
        if node.op != "call_module" or not node.args or getattr(node.args[0], "op", None) != "placeholder":
            continue
        observer = graph_module.get_submodule(node.target)
        observer = getattr(observer, "activation_post_process", observer)  # FakeQuantize wraps one
        if hasattr(observer, "min_val") and hasattr(observer, "max_val"):
            observer.min_val.fill_(low)
            observer.max_val.fill_(high)
            pinned += 1
    return pinned
