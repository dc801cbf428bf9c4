"""A stand-in second device, so a CPU-only machine catches tensors left on the wrong device.

``FakeDevice`` is a ``TorchDispatchMode``. Inside it, tensors "on" the fake device (type ``lazy``
by default: torch moves tensors there without initialising a backend, and no code path treats it specially) are wrapper tensors over CPU storage: each
op on them runs on the CPU and its results are wrapped again. A factory call that names the
fake device makes a wrapped tensor; a call that names no device makes a plain CPU tensor, as on
a real GPU machine. An op that mixes a wrapped tensor with a plain CPU one (other than a 0-dim
scalar, or a copy between devices) raises :class:`DeviceMismatch`, naming the op; this is the
"Expected all tensors to be on the same device" a GPU would raise, found without one.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

aten = torch.ops.aten

# Ops that legitimately take tensors on two devices (moves between them), as on CUDA.
CROSS_DEVICE_OPS = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default,
                    aten._copy_from_and_resize.default, aten.lift_fresh.default}


class DeviceMismatch(RuntimeError):
    """An op received tensors on the fake device and on the CPU."""


class OnDevice(torch.Tensor):
    """A tensor that says it lives on the fake device; its values are the CPU tensor ``inner``."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor, device: torch.device) -> OnDevice:
        out = torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(),
                                                  storage_offset=inner.storage_offset(), dtype=inner.dtype,
                                                  layout=inner.layout, device=device,
                                                  requires_grad=inner.requires_grad)
        out.inner = inner
        return out

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:  # printing must not dispatch through the mode
        return f"OnDevice({self.device}, {self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        raise RuntimeError(f"{func} on a fake-device tensor outside FakeDevice()")

    def __tensor_flatten__(self) -> tuple[list[str], Any]:
        return ["inner"], self.device

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], device: Any, size: Any, stride: Any) -> OnDevice:
        return OnDevice(inner["inner"], device)


class _Factories(TorchFunctionMode):
    """``torch.tensor(..., device=fake)`` builds its tensor below the dispatch modes; build it on the
    CPU and move it instead."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        target = kwargs.get("device")
        if target is not None and not isinstance(target, int) and torch.device(target).type == self.device.type:
            kwargs["device"] = "cpu"
            out = func(*args, **kwargs)
            return out.to(self.device) if isinstance(out, torch.Tensor) else out
        return func(*args, **kwargs)


class FakeDevice(TorchDispatchMode):
    """Run with a fake second device; every op is checked for mixed devices (see module doc)."""

    def __init__(self, device: str = "lazy") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.ops_on_device = 0
        self._factories = _Factories(self.device)

    def __enter__(self) -> FakeDevice:
        self._factories.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._factories.__exit__(*exc)

    def _is_fake(self, device: Any) -> bool:
        return device is not None and torch.device(device).type == self.device.type

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        tensors: list[torch.Tensor] = []
        tree_map(lambda t: tensors.append(t) if isinstance(t, torch.Tensor) else None, (args, kwargs))
        on_fake = any(isinstance(t, OnDevice) for t in tensors)
        strays = [t for t in tensors if not isinstance(t, OnDevice) and t.dim() > 0 and t.device.type == "cpu"]
        if on_fake and strays and func not in CROSS_DEVICE_OPS and not _cpu_index(func, args):
            shapes = ", ".join(str(tuple(t.shape)) for t in strays[:3])
            raise DeviceMismatch(f"{func}: tensors on {self.device} and on the CPU ({shapes}); "
                                 "a tensor was made without a device or left on the CPU")
        target = kwargs.get("device")
        to_fake = self._is_fake(target) or (on_fake and target is None)
        if self._is_fake(target):
            kwargs["device"] = torch.device("cpu")
        given = args
        args, kwargs = tree_map(_unwrap, (args, kwargs))
        out = func(*args, **kwargs)
        if given and isinstance(given[0], OnDevice) and out is args[0]:
            return given[0]  # in place: the caller's tensor already aliases the result
        if not to_fake:
            return out
        self.ops_on_device += 1
        return tree_map(lambda t: OnDevice(t, self.device) if isinstance(t, torch.Tensor) else t, out)


def _unwrap(t: Any) -> Any:
    return t.inner if isinstance(t, OnDevice) else t


CPU_INDEX_OPS = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


def _cpu_index(func: Any, args: tuple) -> bool:
    """CUDA accepts CPU index tensors in advanced indexing (``x[idx]``); so does the guard."""
    return func in CPU_INDEX_OPS


__all__ = ["DeviceMismatch", "FakeDevice", "OnDevice"]
