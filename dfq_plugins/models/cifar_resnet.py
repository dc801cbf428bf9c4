"""CIFAR-10 ResNet-20/56 (He et al. 2016, option-A shortcuts), matching the Idelbayev checkpoints."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..io import load_weights_file
from ..spec import InputSpec

CIFAR_SPEC = InputSpec(shape=(3, 32, 32), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=10)


class PadShortcut(nn.Module):
    """Parameter-free "option A" shortcut: subsample by 2 and zero-pad channels on both sides."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(planes // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        in_planes = 16
        for stage, planes in enumerate((16, 32, 64), start=1):
            layers = []
            for i in range(blocks_per_stage):
                stride = 2 if (i == 0 and stage > 1) else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.pool(x), 1))


def load_cifar_resnet(depth: int, weights: str | None) -> CifarResNet:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    model = CifarResNet((depth - 2) // 6)
    if weights is not None:
        ckpt = load_weights_file(weights)
        state = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
        model.load_state_dict(state, strict=True)
    return model.eval()
