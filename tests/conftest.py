"""Shared fixtures: tiny real models, the ResNet-20 checkpoint when the assets exist, temp caches."""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
warnings.filterwarnings("ignore", category=DeprecationWarning)
torch.set_num_threads(2)

from dfq_plugins.spec import InputSpec

TINY_SPEC = InputSpec(shape=(3, 16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), num_classes=4)


class TinyNet(nn.Module):
    """A small conv net with BatchNorm: real structure, trains in a second."""

    def __init__(self, channels: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def make_tiny(channels: int = 3, seed: int = 0) -> nn.Module:
    """TinyNet whose BN running statistics come from image-like batches inside the valid pixel range."""
    torch.manual_seed(seed)
    m = TinyNet(channels)
    m.train()
    with torch.no_grad():
        for _ in range(5):
            pixels = torch.rand(32, channels, 1, 1) * 0.6 + 0.2 + 0.1 * torch.randn(32, channels, 16, 16)
            m((pixels.clamp(0, 1) - 0.5) / 0.25)
    return m.eval()


@functools.lru_cache(maxsize=1)
def _trained_tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    m = TinyNet(3)
    opt = torch.optim.Adam(m.parameters(), lr=0.02)
    m.train()
    for _ in range(150):
        labels = torch.randint(0, 4, (64,))
        pixels = 0.35 + 0.1 * torch.randn(64, 3, 16, 16)
        shift = torch.zeros(64, 3, 1, 1)
        shift[labels < 3, labels[labels < 3]] = 0.3
        pixels = pixels + shift - 0.25 * (labels == 3).float().view(-1, 1, 1, 1)
        loss = nn.functional.cross_entropy(m((pixels.clamp(0, 1) - 0.5) / 0.25), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def make_trained_tiny() -> nn.Module:
    """TinyNet trained for a second on a 4-class colour task (red, green, blue or dark images), so
    its logits mean something and label-conditioned synthesis can reach its targets. Trained once
    per session; every call returns a fresh copy (and leaves the global RNG as training did)."""
    state = _trained_tiny_state()
    torch.manual_seed(0)
    m = TinyNet(3)
    m.load_state_dict(state)
    return m.eval()


@pytest.fixture
def tiny():
    return make_tiny(), TINY_SPEC


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DFQ_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def resnet20():
    from dfq_plugins import plugins
    from dfq_plugins.errors import AssetsMissingError

    entry = plugins.get("models", "cifar10-resnet20").obj
    try:
        model, spec = entry.load()
        test = entry.test_set()
        pool = entry.calibration_pool()
    except AssetsMissingError as exc:
        pytest.skip(f"evaluation assets absent: {exc}")
    return model, spec, test, pool


def interrupt_zeroq_once_at_batch(monkeypatch, index: int) -> list[int]:
    """Make zeroq raise KeyboardInterrupt the first time it reaches batch ``index`` (Ctrl-C there);
    returns the list of batch indices synthesized, in order, for the test to inspect."""
    from dfq_plugins.synthesizers.zeroq import ZeroQSynthesizer

    real_batch = ZeroQSynthesizer.optimize_batch
    calls: list[int] = []

    def flaky(self, teacher, n, seed, i, bar, targets=None):
        calls.append(i)
        if i == index and calls.count(index) == 1:
            raise KeyboardInterrupt
        return real_batch(self, teacher, n, seed, i, bar, targets)

    monkeypatch.setattr(ZeroQSynthesizer, "optimize_batch", flaky)
    return calls
