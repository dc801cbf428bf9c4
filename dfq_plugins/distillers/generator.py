"""GDFQ's conditional generator, with an optional content/style split (Causal-DFQ).

CIFAR layout of GDFQ/AdaDFQ: the label embedding multiplies z, then Linear -> 128 x (H/4)^2 ->
BN -> up x2 -> conv 128 -> BN(eps 0.8) -> LeakyReLU -> up x2 -> conv 64 -> BN(eps 0.8) ->
LeakyReLU -> conv C -> tanh -> BN(C, affine=False). The last BN puts the output in the
teacher's normalised input space with unit variance per channel. ``bn_eps`` keeps GDFQ's 0.8
quirk by default. Image sizes that are not multiples of 4 are resized at the end.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConditionalGenerator(nn.Module):
    """``G(z, y)``; with ``style_dim > 0`` the input is [embedding(y), s] (content and style codes)."""

    def __init__(self, num_classes: int, shape: tuple[int, int, int], latent_dim: int = 100, width: int = 128,
                 bn_eps: float = 0.8, style_dim: int = 0) -> None:
        super().__init__()
        c, h, w = shape
        self.shape = shape
        self.latent_dim = latent_dim
        self.style_dim = style_dim
        self.h0, self.w0 = max(1, h // 4), max(1, w // 4)
        self.embed = nn.Embedding(num_classes, latent_dim)
        in_dim = latent_dim + style_dim
        self.fc = nn.Linear(in_dim, width * self.h0 * self.w0)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width, eps=bn_eps)
        self.conv2 = nn.Conv2d(width, width // 2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width // 2, eps=bn_eps)
        self.conv3 = nn.Conv2d(width // 2, c, 3, padding=1)
        self.out_bn = nn.BatchNorm2d(c, affine=False)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``z``: (N, latent_dim) noise (GDFQ), or (N, style_dim) style codes when split."""
        e = self.embed(labels)
        h = torch.cat([e, z], 1) if self.style_dim else e * z
        x = self.fc(h).view(h.shape[0], -1, self.h0, self.w0)
        x = self.bn0(x)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = F.leaky_relu(self.bn1(self.conv1(x)), 0.2)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = F.leaky_relu(self.bn2(self.conv2(x)), 0.2)
        x = self.out_bn(torch.tanh(self.conv3(x)))
        if x.shape[-2:] != self.shape[1:]:
            x = F.interpolate(x, size=self.shape[1:], mode="bilinear", align_corners=False)
        return x

    def code_dim(self) -> int:
        return self.style_dim or self.latent_dim
