"""A stand-in second device, so a CPU-only machine catches tensors left on the wrong device.

``FakeDevice`` is a ``TorchDispatchMode``. Inside it, a tensor "on" the fake device (type ``lazy``
by default: torch moves tensors there without initialising a backend, and no code path treats it
specially) is a CPU tensor whose Python class says otherwise (``OnDevice``): its ``.device`` is the
fake device, ``.cpu()``/``.to("cpu")`` give a plain CPU copy, ``.numpy()`` refuses as on CUDA, and
every op on it runs on the CPU and is tagged again. Because the values live in the tensor itself,
in-place resizes (observers do them) and autograd behave as on a real device. ``module.to(fake)``
retags parameters and buffers in place, so a module keeps its identity (buffers a module keeps on
the host, its ``host_buffers``, stay plain, as ``.to("cuda")`` leaves them on the CPU).

Every read of a value on the fake device by the host (``.item()``, ``bool(t)``, ``float(t)``,
``.tolist()``, ``.cpu()``: on a GPU, a wait for the stream) is recorded in ``host_syncs`` with the
line of our code that asked.

A factory call that names the fake device makes a tagged tensor; one that names no device makes a
plain CPU tensor, as on a GPU machine. An op that mixes a tagged tensor with a plain CPU one (other
than a 0-dim scalar, a move between devices, or CPU indices) raises :class:`DeviceMismatch`,
naming the op: the "Expected all tensors to be on the same device" a GPU would raise.

``torch.export`` cannot trace tagged tensors, so inside the guard it runs on the untagged module
and the program it returns is tagged (a graph that builds a tensor on the CPU in ``forward`` would
be a false alarm then; the models here build none).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

aten = torch.ops.aten

# Ops that legitimately take tensors on two devices, as on CUDA: moves, and CPU index tensors.
CROSS_DEVICE_OPS = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default,
                    aten._copy_from_and_resize.default, aten.lift_fresh.default, aten.index.Tensor,
                    aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}
FAKE = torch.device("lazy")


def _builds_flags_on_cpu(func: Any) -> bool:
    """C++ composites that build a one-element flag with the input's options, which are the CPU's here
    (``fake_quantize_per_tensor_affine`` adds ``ones(1)`` for ``fake_quant_enabled``); on a GPU that flag
    is made there."""
    return "fake_quantize" in func.name()


class DeviceMismatch(RuntimeError):
    """An op received tensors on the fake device and on the CPU."""


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(nn.Parameter if isinstance(t, nn.Parameter) else torch.Tensor)


class OnDevice(torch.Tensor):
    """A CPU tensor that says it lives on the fake device."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return FAKE

    @property
    def is_cpu(self) -> bool:  # type: ignore[override]
        return False

    def cpu(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        _note_host_sync()
        with _paused():
            return torch.Tensor.clone(self).as_subclass(torch.Tensor)

    def numpy(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        raise TypeError(f"can't convert {FAKE} device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                        "to host memory first.")

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if isinstance(args[0] if args else None, torch.Tensor):
            device = args[0].device
        with _paused():
            out = torch.Tensor.to(self.as_subclass(torch.Tensor), dtype=dtype or self.dtype, copy=False,
                                  **({"memory_format": memory_format} if memory_format is not None else {}))
        if device is not None and device.type == "cpu":
            _note_host_sync()
            return out.clone() if out.data_ptr() == self.data_ptr() else out
        return self if out.data_ptr() == self.data_ptr() and out.dtype == self.dtype else tag(out)

    def tolist(self) -> Any:  # type: ignore[override]
        _note_host_sync()  # a copy to the host, as on a GPU
        with _paused():
            return torch.Tensor.tolist(self.as_subclass(torch.Tensor))

    @property
    def data(self) -> torch.Tensor:  # type: ignore[override]
        return tag(torch.Tensor.data.__get__(self))

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        torch.Tensor.data.__set__(self, value)

    def __repr__(self, **kwargs: Any) -> str:
        with _paused():
            return f"OnDevice({FAKE}, {torch.Tensor.__repr__(self.as_subclass(torch.Tensor))})"


class OnDeviceParameter(OnDevice, nn.Parameter):
    """A parameter that says it lives on the fake device."""


def tag(t: Any) -> Any:
    """Mark a CPU tensor (in place) as living on the fake device."""
    if isinstance(t, torch.Tensor) and not isinstance(t, OnDevice) and t.device.type == "cpu":
        t.__class__ = OnDeviceParameter if isinstance(t, nn.Parameter) else OnDevice
    return t


def untag(t: Any) -> Any:
    if isinstance(t, OnDevice):
        t.__class__ = nn.Parameter if isinstance(t, nn.Parameter) else torch.Tensor
    return t


def _module_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None:
                yield p
                if p.grad is not None:
                    yield p.grad
        host = getattr(m, "host_buffers", ())  # switches a module keeps on the host (dfq_plugins.quant.hostflags)
        for name, b in m._buffers.items():
            if b is not None and name not in host:
                yield b
        for name, v in vars(m).items():  # constants a GraphModule keeps as plain attributes
            if isinstance(v, torch.Tensor) and name not in host:
                yield v


_ACTIVE: list[FakeDevice] = []


def _note_host_sync() -> None:
    """A value on the device read by the host (on a GPU: a wait for the stream)."""
    if _ACTIVE and not _ACTIVE[-1].paused:
        _ACTIVE[-1].host_syncs.append(_caller())


@contextlib.contextmanager
def _paused() -> Iterator[None]:
    """Run plain CPU code under the guard (its own bookkeeping)."""
    if not _ACTIVE:
        yield
        return
    mode = _ACTIVE[-1]
    mode.paused += 1
    try:
        yield
    finally:
        mode.paused -= 1


class _Factories(TorchFunctionMode):
    """``torch.tensor(..., device=fake)`` builds its tensor below the dispatch modes; build it on the
    CPU and tag it instead."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        target = kwargs.get("device")
        if target is not None and not isinstance(target, int) and torch.device(target).type == FAKE.type:
            kwargs["device"] = "cpu"
            return tag(func(*args, **kwargs))
        return func(*args, **kwargs)


class FakeDevice(TorchDispatchMode):
    """Run with a fake second device; every op is checked for mixed devices (see module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.device = FAKE
        self.ops_on_device = 0
        self.host_syncs: list[str] = []  # where a value on the device was read on the host (.item(), bool(t), ...)
        self.paused = 0
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> FakeDevice:
        _ACTIVE.append(self)
        self._stack.enter_context(_Factories())
        self._stack.enter_context(_patched(nn.Module, "to", _module_to))
        self._stack.enter_context(_patched(torch.export, "export", _on_untagged))
        with contextlib.suppress(ImportError):
            from torchao.quantization.pt2e import quantize_pt2e

            for name in ("prepare_pt2e", "prepare_qat_pt2e", "convert_pt2e"):
                self._stack.enter_context(_patched(quantize_pt2e, name, _on_untagged))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._stack.close()
        _ACTIVE.remove(self)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if self.paused:
            return func(*args, **kwargs)
        tensors: list[torch.Tensor] = []
        tree_map(lambda t: tensors.append(t) if isinstance(t, torch.Tensor) else None, (args, kwargs))
        on_fake = any(isinstance(t, OnDevice) for t in tensors)
        if on_fake and func is aten._local_scalar_dense.default:
            _note_host_sync()
        strays = [t for t in tensors if not isinstance(t, OnDevice) and t.dim() > 0 and t.device.type == "cpu"
                  and not (t.numel() == 1 and _builds_flags_on_cpu(func))]
        if on_fake and strays and func not in CROSS_DEVICE_OPS:
            shapes = ", ".join(str(tuple(t.shape)) for t in strays[:3])
            raise DeviceMismatch(f"{func}: tensors on {FAKE} and on the CPU ({shapes}); a tensor was made "
                                 "without a device or left on the CPU")
        target = kwargs.get("device")
        to_fake = target is not None and torch.device(target).type == FAKE.type
        if to_fake:
            kwargs["device"] = torch.device("cpu")
        elif target is not None:  # an explicit move elsewhere (to the CPU): plain tensors out
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if not (to_fake or on_fake):
            return out
        if func._schema.is_mutable and args and out is args[0]:
            return out  # in place: the destination keeps its device (a CPU tensor filled from the device stays CPU)
        self.ops_on_device += 1
        return tree_map(tag, out)


def _caller() -> str:
    """The innermost frame outside torch and this module: where a host sync was asked for."""
    import traceback

    for frame in reversed(traceback.extract_stack()[:-3]):
        if "/torch/" not in frame.filename and not frame.filename.endswith("device_guard.py"):
            return f"{'/'.join(frame.filename.split('/')[-2:])}:{frame.lineno} {frame.name}"
    return "?"


@contextlib.contextmanager
def _patched(owner: Any, name: str, make: Any) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, make(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def _module_to(original: Any) -> Any:
    def to(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None or device is None or device.type not in (FAKE.type, "cpu"):
            return original(self, *args, **kwargs)
        for t in _module_tensors(self):  # in place: the module and its tensors keep their identity
            tag(t) if device.type == FAKE.type else untag(t)
        return self
    return to


def _on_untagged(original: Any) -> Any:
    """Run a graph pass (torch.export, prepare_pt2e, convert_pt2e) on plain CPU tensors: they fakeify
    or re-trace the module, which a tagged tensor cannot go through. The module's tensors are
    tagged again afterwards, and so is the module returned."""
    def call(module: Any, *args: Any, **kwargs: Any) -> Any:
        tagged = [t for t in _module_tensors(module) if isinstance(t, OnDevice)] if isinstance(module, nn.Module) \
            else []
        inputs = args[0] if args and isinstance(args[0], tuple) else None
        on_device = bool(tagged) or any(isinstance(a, OnDevice) for a in inputs or ())
        for t in tagged:
            untag(t)
        if inputs is not None:
            args = (tuple(a.cpu() if isinstance(a, OnDevice) else a for a in inputs), *args[1:])
        try:
            with _paused():
                out = original(module, *args, **kwargs)
        finally:
            for t in tagged:
                tag(t)
        if not on_device:
            return out
        if isinstance(out, nn.Module):
            for t in _module_tensors(out):
                tag(t)
            return out
        return _TaggedProgram(out)
    return call


class _TaggedProgram:
    """An ExportedProgram whose ``.module()`` comes back on the fake device."""

    def __init__(self, program: Any) -> None:
        self._program = program

    def module(self, *args: Any, **kwargs: Any) -> nn.Module:
        gm = self._program.module(*args, **kwargs)
        for t in _module_tensors(gm):
            tag(t)
        return gm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._program, name)


__all__ = ["DeviceMismatch", "FakeDevice", "OnDevice", "tag", "untag"]
