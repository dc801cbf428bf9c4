"""A converted PT2E model behaves like a module in ordinary loops: .eval() and .train() work."""
from __future__ import annotations

import torch

from dfq_plugins import QuantScheme
from dfq_plugins.api import make_toolchain

from .conftest import make_tiny
from .test_lowbit import calib


def test_a_converted_pt2e_model_takes_eval_and_train_and_keeps_its_outputs():
    q = make_toolchain("torchao-pt2e").quantize(make_tiny(), QuantScheme.parse("w8a8"), calib())
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        before = q(x)
        q.eval()  # torchao's replacement returns None, not the module
        torch.testing.assert_close(q(x), before)
        q.train()
        q.eval()
        torch.testing.assert_close(q(x), before)
