"""Fault matrix, data-dependent branches: NNCF names the layers its trace never reached, and the FX
error recommends nothing that would be wrong."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dfq_plugins import CalibrationSet, QuantScheme
from dfq_plugins.api import make_toolchain
from dfq_plugins.errors import UntraceableModelError


class Branchy(nn.Module):
    """Takes `a` or `b` by the sign of its activations' mean: a data-dependent branch."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x).relu()
        x = self.a(x) if x.mean() > 0.0 else self.b(x)
        return self.fc(x.relu().mean((2, 3)))


def branchy() -> nn.Module:
    torch.manual_seed(0)
    return Branchy().eval()


def one_path_set() -> CalibrationSet:
    return CalibrationSet(torch.rand(16, 3, 8, 8) + 1.0, batch_size=8)  # positive images: always branch `a`


def test_nncf_names_the_layer_its_trace_never_reached():
    with pytest.warns(UserWarning, match=r"without weight quantization: b\. NNCF quantizes what its trace"):
        make_toolchain("nncf").quantize(branchy(), QuantScheme.parse("w8a8"), one_path_set())


def test_the_fx_error_does_not_recommend_a_toolchain_that_would_be_wrong():
    with pytest.raises(UntraceableModelError, match="branches on tensor values") as info:
        make_toolchain("torch-ao-fx").quantize(branchy(), QuantScheme.parse("w8a8"), one_path_set())
    assert "Make the branch static" in str(info.value)
    assert "Use toolchain" not in str(info.value)
