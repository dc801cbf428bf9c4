"""Where the work runs: the model's device, or the one the user names.

Every random draw stays on the CPU (seeded ``torch.Generator``) and is moved to the device
afterwards, so a seed gives the same starting images, labels and batches on every device,
and a CPU run is bitwise what it was before devices existed. Calibration sets, checkpoints
and caches always hold CPU tensors.
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import DeviceError

AUTO = "auto"


def module_device(model: Any) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model with neither
    (or for a callable that is not a module, such as a loaded OpenVINO artefact)."""
    if not isinstance(model, nn.Module):
        return torch.device("cpu")
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if first is None else first.device


def model_devices(model: nn.Module) -> set[torch.device]:
    return {t.device for t in (*model.parameters(), *model.buffers())}


def resolve_device(device: str | torch.device | None, model: nn.Module | None = None) -> torch.device:
    """``None``/``"auto"``: where ``model`` already lives; otherwise the named device, checked.

    A clear DeviceError for a name torch does not know, for CUDA/MPS on a machine without
    them (a CPU build of torch, or no driver), and for a model spread over several devices.
    """
    if device is None or device == AUTO:
        if model is None:
            return torch.device("cpu")
        devices = model_devices(model)
        if len(devices) > 1:
            raise DeviceError(f"the model's weights are on several devices ({sorted(map(str, devices))}); "
                              "move it to one (model.to('cuda')) or pass device='cuda' / --device cuda")
        return next(iter(devices), torch.device("cpu"))
    if not isinstance(device, (str, torch.device)):
        raise DeviceError(f"device must be a string such as 'cpu', 'cuda' or 'cuda:1', got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise DeviceError(f"device={device!r} is not a device name torch knows ({exc}); "
                          "use 'cpu', 'cuda', 'cuda:N' or 'auto'") from exc
    if dev.type == "cuda":
        from .distributed import local_device

        dev = local_device(dev)  # under torchrun, plain "cuda" is this rank's GPU
        if not torch.cuda.is_available():
            build = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA device or driver is visible"
            raise DeviceError(f"device={device!r} asked for CUDA, but {build}; use device='cpu' "
                              "(or install a CUDA build of torch on a machine with a GPU)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"numbered from 0")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device={device!r} asked for Apple MPS, which is not available here; use device='cpu'")
    elif dev.type == "meta":
        raise DeviceError("device='meta' holds no values; use 'cpu' or 'cuda'")
    return dev


@contextlib.contextmanager
def placed(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Run with ``model`` on ``device`` and give it back where it was (the user's model is theirs)."""
    before = module_device(model)
    if before == device:
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to(before)


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch (tensor, tuple/list or dict of tensors) on ``device``; a no-op when it is there."""
    if isinstance(batch, torch.Tensor):
        return batch if batch.device == device else batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, tuple):
        return tuple(to_device(t, device) for t in batch)
    if isinstance(batch, list):
        return [to_device(t, device) for t in batch]
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


__all__ = ["AUTO", "model_devices", "module_device", "placed", "resolve_device", "to_device"]
