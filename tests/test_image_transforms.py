"""Your own image folder reaches the model as the model's own test set does: images already at the
input size go in unchanged, and the transform for the others is a stated choice."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dfq_plugins.api import evaluate
from dfq_plugins.cli import main
from dfq_plugins.imagefolder import load_image_folder
from tests.conftest import TINY_SPEC


def write_pngs(root, images: np.ndarray, labels: np.ndarray, classes: int) -> None:
    from PIL import Image

    for c in range(classes):
        (root / f"{c:04d}").mkdir(parents=True, exist_ok=True)  # every class, so folder order is label order
    for i, (pixels, label) in enumerate(zip(images, labels)):
        Image.fromarray(pixels).save(root / f"{int(label):04d}" / f"{i:05d}.png")


def test_cifar_pngs_give_the_same_top1_as_the_tensors_to_the_image(resnet20, tmp_path, capsys):
    from dfq_plugins.models.assets import asset

    model, spec, test, _ = resnet20
    with np.load(asset("cifar10/test932_lossless.npz")) as z:
        write_pngs(tmp_path / "test", z["images"], z["labels"], 10)
        order = torch.from_numpy(np.argsort(z["labels"], kind="stable"))  # the folder reads class by class
    folder = load_image_folder(tmp_path / "test", spec)
    assert "932 unchanged" in folder.note
    assert torch.equal(folder.labels, test.labels[order])
    assert torch.allclose(folder.images, test.images[order], atol=1e-6)
    with torch.no_grad():  # to the image
        assert torch.equal(model(folder.images).argmax(1), model(test.images[order]).argmax(1))
    assert evaluate(model, folder.images, folder.labels) == evaluate(model, test.images, test.labels)
    # the CLI says which transform ran, and an explicit ImageNet transform is what the old default did
    assert main(["quantize", "--model", "cifar10-resnet20", "--source", "noise", "--images", "8",
                 "--test-dir", str(tmp_path / "test"), "--quiet"]) == 0
    assert "--test-dir images: 932 unchanged" in capsys.readouterr().out
    zoomed = load_image_folder(tmp_path / "test", spec, transform="imagenet", limit=50)
    assert "50 the ImageNet evaluation transform" in zoomed.note
    assert not torch.allclose(zoomed.images, test.images[order][:50])


def test_each_transform_does_what_it_says_and_none_refuses_other_sizes(tmp_path, capsys):
    rng = np.random.default_rng(0)
    write_pngs(tmp_path / "mixed", rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8), np.array([0, 1, 2]), 4)
    write_pngs(tmp_path / "mixed", rng.integers(0, 256, (2, 40, 30, 3), dtype=np.uint8), np.array([3, 3]), 4)
    auto = load_image_folder(tmp_path / "mixed", TINY_SPEC)
    assert "3 unchanged" in auto.note and "2 the ImageNet evaluation transform" in auto.note
    assert auto.images.shape == (5, *TINY_SPEC.shape)
    assert "5 a plain resize" in load_image_folder(tmp_path / "mixed", TINY_SPEC, transform="resize").note
    with pytest.raises(ValueError, match="30x40 but the model takes 16x16"):
        load_image_folder(tmp_path / "mixed", TINY_SPEC, transform="none")
    with pytest.raises(ValueError, match="choose one of auto, imagenet, resize, none"):
        load_image_folder(tmp_path / "mixed", TINY_SPEC, transform="crop")
    with pytest.raises(SystemExit) as stop:  # argparse refuses before any work
        main(["quantize", "--model", "cifar10-resnet20", "--test-dir", str(tmp_path / "mixed"),
              "--image-transform", "fancy"])
    assert stop.value.code == 2 and "invalid choice: 'fancy'" in capsys.readouterr().err


@pytest.mark.slow
def test_imagenet_jpegs_with_the_imagenet_transform_give_the_val1300_figure(tmp_path):
    """Larger images through --test-dir's ImageNet transform score as the packaged val1300 test set
    (which resizes to 256x256 and crops, so the two differ slightly in the pixels, not in the figure)."""
    import tarfile

    from dfq_plugins import plugins
    from dfq_plugins.errors import AssetsMissingError
    from dfq_plugins.models.assets import IMAGENET_TEST_COUNT, asset

    entry = plugins.get("models", "efficientnet-lite0").obj
    try:
        test = entry.test_set()
        archive = asset("imagenet/val1300.tar.gz")
    except AssetsMissingError as exc:
        pytest.skip(f"evaluation assets absent: {exc}")
    model, spec = entry.load()
    root = tmp_path / "val"  # (tmp_path also holds the test's cache)
    with tarfile.open(archive) as tar:
        members = {m.name.lstrip("./"): m for m in tar.getmembers()}
        listing = [line for line in tar.extractfile(members["dataset.txt"]).read().decode().splitlines() if line]
        for c in range(spec.num_classes):
            (root / f"{c:04d}").mkdir(parents=True)
        for i, line in enumerate(listing[:IMAGENET_TEST_COUNT]):
            name, label = (s.strip() for s in line.split(","))
            data = tar.extractfile(members[name.lstrip("./")]).read()
            (root / f"{int(label):04d}" / f"{i:04d}{name[name.rfind('.'):]}").write_bytes(data)
    folder = load_image_folder(root, spec, transform="imagenet")
    assert torch.equal(folder.labels.sort().values, test.labels.sort().values)
    ours, packaged = evaluate(model, folder.images, folder.labels), evaluate(model, test.images, test.labels)
    assert abs(ours - packaged) <= 0.2, (ours, packaged)


def test_a_recipe_names_the_transform_and_a_wrong_one_is_refused_before_any_work(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "cifar10-resnet20"\nimage_transform = "zoom"\n')
    assert main(["quantize", "--recipe", str(recipe), "--quiet"]) == 2
    assert "image_transform = 'zoom'; choose one of auto, imagenet, resize, none" in capsys.readouterr().err
