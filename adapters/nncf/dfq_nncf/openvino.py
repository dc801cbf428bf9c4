"""NNCF on an OpenVINO model with data-free calibration.

Synthesis needs gradients, so it runs on the torch model of the same network; the set then
feeds ``nncf.quantize`` on the OpenVINO model (the path most NNCF users are on), as numpy
batches laid out the way the IR's input expects (NCHW, or NHWC when the IR takes channels last).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from dfq_plugins.data import CalibrationSet
from dfq_plugins.errors import DFQError
from dfq_plugins.spec import InputSpec


def ir_layout(ov_model: Any, spec: InputSpec) -> str:
    """``"NCHW"`` or ``"NHWC"``: how the IR's first input holds an image of ``spec``; a clear error
    when it holds neither (another size, another channel count)."""
    shape = ov_model.inputs[0].get_partial_shape()
    dims = [d.get_length() if d.is_static else None for d in shape]
    c, h, w = spec.shape
    if len(dims) != 4:
        raise DFQError(f"the OpenVINO model's input has shape {shape}, not a batch of images (N, C, H, W)")
    if dims[1:] in ([c, h, w], [c, None, None]) or (dims[1] == c and dims[2:] == [None, None]):
        return "NCHW"
    if dims[1:] == [h, w, c] or (dims[3] == c and dims[1:3] == [None, None]):
        return "NHWC"
    raise DFQError(f"the OpenVINO model takes {shape}, which matches neither (N, {c}, {h}, {w}) nor "
                   f"(N, {h}, {w}, {c}) from the input spec; check the spec or the IR")


def openvino_dataset(cs: CalibrationSet, layout: str = "NCHW") -> Any:
    """An ``nncf.Dataset`` of numpy batches for an OpenVINO (or ONNX) model in ``layout``."""
    import nncf

    def to_numpy(batch: Any) -> Any:
        x = batch[0] if isinstance(batch, tuple) else batch
        if layout == "NHWC":
            x = x.permute(0, 2, 3, 1)
        return x.detach().cpu().contiguous().numpy()

    return nncf.Dataset(list(cs), to_numpy)


def calibration_dataset_openvino(ov_model: Any, torch_model: nn.Module, source: str | dict[str, Any] = "zeroq", *,
                                 input_spec: InputSpec, num_samples: int = 256, batch_size: int = 32, seed: int = 0,
                                 cache: bool = True, progress: bool = True) -> Any:
    """A data-free ``nncf.Dataset`` for ``nncf.quantize(ov_model, ...)``, synthesized from ``torch_model``."""
    from dfq_plugins.api import synthesize

    layout = ir_layout(ov_model, input_spec)
    cs = synthesize(torch_model, source, input_spec=input_spec, num_samples=num_samples, batch_size=batch_size,
                    seed=seed, cache=cache, progress=progress)
    return openvino_dataset(cs, layout)


def quantize_openvino(ov_model: Any, torch_model: nn.Module, *, source: str | dict[str, Any] = "zeroq",
                      input_spec: InputSpec, num_samples: int = 256, batch_size: int = 32, seed: int = 0,
                      progress: bool = True, **nncf_kwargs: Any) -> Any:
    """``nncf.quantize(ov_model, data-free dataset)``: the quantized OpenVINO model.

    ``torch_model`` is the same network in torch (synthesis needs its gradients and BatchNorm
    statistics; e.g. the model ``ov_model`` was converted from). NNCF's keyword arguments pass
    through; ``subset_size`` defaults to the whole set."""
    import nncf

    dataset = calibration_dataset_openvino(ov_model, torch_model, source, input_spec=input_spec,
                                           num_samples=num_samples, batch_size=batch_size, seed=seed,
                                           progress=progress)
    nncf_kwargs.setdefault("subset_size", -(-num_samples // batch_size))
    return nncf.quantize(ov_model, dataset, **nncf_kwargs)


__all__ = ["calibration_dataset_openvino", "ir_layout", "openvino_dataset", "quantize_openvino"]
