"""The same weights written another way quantize the same: functional ``F.relu``, ``x.mean`` pooling
and an ``F.pad`` shortcut, as users write ResNets, against the package's module-based definition.

A non-strict ``torch.export`` leaves X86InductorQuantizer blind to ``F.relu``: conv-bn-relu and
add-relu were not fused, the pre-ReLU tensor was quantized, and at W4A4 a user-written ResNet-20
with ``reconstruct`` reached 83.48 (real) and 86.37 (zeroq) where the package's gets 88.20 and 89.70.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfq_plugins
from dfq_plugins import CalibrationSet

from .conftest import TINY_SPEC, make_tiny


class FunctionalTiny(type(make_tiny())):
    """TinyNet with ``F.relu`` and ``x.mean`` in place of its modules."""

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def fake_quants_feeding_relu(student: torch.fx.GraphModule) -> list[str]:
    """Fake-quant nodes whose output goes into a ReLU: the pre-ReLU tensor quantized (unfused)."""
    return [n.name for n in student.graph.nodes if n.op == "call_module" and "activation_post_process" in n.name
            and any("relu" in str(u.target) for u in n.users)]


def test_a_relu_written_as_a_function_is_fused_on_pt2e():
    tiny = make_tiny()
    functional = FunctionalTiny()
    functional.load_state_dict(tiny.state_dict())
    cs = CalibrationSet(torch.rand(16, 3, 16, 16), batch_size=8)
    students = [dfq_plugins.quantize(m.eval(), toolchain="torchao-pt2e", source=cs, scheme="w4a4",
                                     input_spec=TINY_SPEC, trainable=True, progress=False) for m in (tiny, functional)]
    assert [fake_quants_feeding_relu(s) for s in students] == [[], []]  # TinyNet's own torch.relu too


class Shortcut(nn.Module):
    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = Shortcut((cout - cin) // 2) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class UserResNet20(nn.Module):
    """CIFAR ResNet-20 as a user might write it; the state_dict keys are the package's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        widths = [(16, 16, 1), (16, 32, 2), (32, 64, 2)]
        for i, (cin, cout, stride) in enumerate(widths, 1):
            setattr(self, f"layer{i}", nn.Sequential(Block(cin, cout, stride), Block(cout, cout, 1),
                                                     Block(cout, cout, 1)))
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.linear(self.layer3(self.layer2(self.layer1(x))).mean(dim=(2, 3)))


def test_a_user_written_resnet20_gains_from_reconstruct_like_the_package_one(resnet20):
    """PT2E W4A4, 128 real images, reconstruct at 60 steps per block: the user's definition lands
    within 0.5 of the package's (before the fix: several points under it)."""
    model, spec, test, pool = resnet20
    user = UserResNet20()
    user.load_state_dict(model.state_dict())
    user.eval()
    data = pool.images[:128]
    top1 = {}
    for name, m in (("package", model), ("user", user)):
        q = dfq_plugins.quantize(m, toolchain="torchao-pt2e", source="real", data=data, num_samples=128,
                                 scheme="w4a4", input_spec=spec, distill={"name": "reconstruct", "steps": 60},
                                 progress=False)
        top1[name] = dfq_plugins.evaluate(q, test.images, test.labels)
    assert top1["user"] >= top1["package"] - 0.5, top1
    assert top1["package"] > 85.0, top1  # reconstruct still gains over calibration (about 83 at W4A4)
