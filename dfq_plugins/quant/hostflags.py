"""Fake-quant switches kept in host memory, so that a quantizer on a GPU never waits for them.

torch.ao's and torchao's ``FakeQuantize`` (and their learnable ones) test their on/off switches in
every forward: ``if self.fake_quant_enabled[0] == 1``. On a GPU each test copies one value back to
the host and waits for the stream to drain, two or three times per quantizer per step: 25 of a
distillation step's 31 host syncs on a three-conv net (counted with ``tests/device_guard.py``).
Only these tests read the switches (no kernel takes them: the fused fake-quant ops that do are not
used here). So the subclass holds them as plain CPU tensors, not buffers: ``.to(device)`` leaves
them where they are, and the toolchains' one-device checks, which look at parameters and buffers,
do not see them. The state dict still carries them under their usual names, so checkpoints and
state dicts are those of the toolchain's own class. On the CPU nothing changes.
"""
from __future__ import annotations

import functools
from typing import Any

from torch import nn

HOST_FLAGS = ("observer_enabled", "fake_quant_enabled", "static_enabled", "learning_enabled")


class HostFlags:
    """Mixin for a fake-quant module: its switches are host tensors, saved and loaded as before."""

    host_buffers: tuple[str, ...] = ()  # the switches this instance holds on the host

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        buffers = self._buffers  # type: ignore[attr-defined]
        names = tuple(n for n in HOST_FLAGS if buffers.get(n) is not None)
        for name in names:
            self.__dict__[name] = buffers.pop(name)  # a plain attribute: .to() and .buffers() skip it
        self.host_buffers = names

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]
        for name in self.host_buffers:
            flag = self.__dict__[name]
            destination[prefix + name] = flag if keep_vars else flag.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in self.host_buffers:
            value = state_dict.pop(prefix + name, None)  # the caller's own copy of the state dict
            if value is not None:
                self.__dict__[name].copy_(value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]


@functools.cache
def with_host_flags(fake_quant_class: type[nn.Module]) -> type[nn.Module]:
    """``fake_quant_class`` with its switches kept on the host (one subclass per class)."""
    return type(fake_quant_class.__name__, (HostFlags, fake_quant_class), {
        "__module__": fake_quant_class.__module__, "__qualname__": fake_quant_class.__qualname__,
        "__doc__": f"{fake_quant_class.__doc__ or fake_quant_class.__name__}\n\n(switches on the host: {__name__})"})


__all__ = ["HOST_FLAGS", "HostFlags", "with_host_flags"]
