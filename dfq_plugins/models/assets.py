"""Where the read-only evaluation assets live, and their loaders.

``$DFQ_ASSETS`` overrides the location; otherwise ``shared/assets`` beside the checkout (or
the current directory's parent) is used. Nothing here is ever copied into the repository.
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import torch

from ..errors import AssetsMissingError, CorruptArtifactError
from ..io import atomic_write, cache_root
from ..spec import InputSpec
from .base import EvalSet

CIFAR_FIRST_POOL_INDEX = 932  # JPEG images from here on are disjoint from the lossless test images


def assets_dir() -> Path:
    env = os.environ.get("DFQ_ASSETS")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    candidates = [here.parents[3] / "shared" / "assets", Path.cwd().parent / "shared" / "assets",
                  Path.cwd() / "shared" / "assets"]
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[0]


def asset(relative: str) -> Path:
    path = assets_dir() / relative
    if not path.exists():
        raise AssetsMissingError(
            f"asset {relative!r} not found under {assets_dir()}; set DFQ_ASSETS to the folder that holds "
            "cifar10/ and imagenet/ (see shared/assets/README.md)"
        )
    return path


def _to_normalized(images_nhwc_uint8: np.ndarray, spec: InputSpec) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc_uint8)).permute(0, 3, 1, 2).float()
    lo, hi = spec.pixel_range
    return spec.normalize(x / 255.0 * (hi - lo) + lo)


def _image_archive(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """``images`` (uint8, N x H x W x C) and ``labels`` of an .npz, checked: no pickled objects, the
    right types and shapes; anything else is a clear error naming the file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
    except (ValueError, OSError, KeyError, EOFError) as exc:
        raise CorruptArtifactError(f"{path} is not a plain image archive ({type(exc).__name__}: {exc}); replace it "
                                   "with the original asset") from None
    if images.dtype != np.uint8 or images.ndim != 4 or labels.ndim != 1 or len(labels) != len(images) \
            or not np.issubdtype(labels.dtype, np.integer):
        raise CorruptArtifactError(f"{path}: expected uint8 images N x H x W x C and N integer labels, got "
                                   f"{images.dtype} {images.shape} and {labels.dtype} {labels.shape}; replace it "
                                   "with the original asset")
    return images, labels


def cifar10_test932(spec: InputSpec) -> EvalSet:
    images, labels = _image_archive(asset("cifar10/test932_lossless.npz"))
    return EvalSet("cifar10-test932", _to_normalized(images, spec), torch.from_numpy(labels).long())


def cifar10_jpeg_pool(spec: InputSpec, count: int | None = None) -> EvalSet:
    with np.load(asset("cifar10/test10k_jpeg_q75.npz")) as z:
        stop = None if count is None else CIFAR_FIRST_POOL_INDEX + count
        imgs = z["images"][CIFAR_FIRST_POOL_INDEX:stop]
        labels = z["labels"][CIFAR_FIRST_POOL_INDEX:stop]
    return EvalSet("cifar10-jpeg[932:]", _to_normalized(imgs, spec), torch.from_numpy(labels).long())


# ImageNet val1300: test = first 1000 entries of dataset.txt, real-data pool = the last 300.
IMAGENET_TEST_COUNT = 1000


def _imagenet_uint8(size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """Decode val1300 once per input size (resize to size + 32, centre-crop size: 256/224 for
    Lite0, 292/260 for Lite2, as EfficientNet-Lite's evaluation crops) and cache the uint8 pixels."""
    from safetensors.numpy import load_file, save_file

    cached = cache_root() / "assets" / f"imagenet-val1300-{size}.safetensors"
    if cached.exists():
        d = load_file(str(cached))
        return d["images"], d["labels"]
    from PIL import Image

    archive = asset("imagenet/val1300.tar.gz")
    images, labels = [], []
    with tarfile.open(archive) as tar:
        members = {m.name.lstrip("./"): m for m in tar.getmembers()}
        listing = tar.extractfile(members["dataset.txt"]).read().decode().splitlines()
        for line in listing:
            if not line.strip():
                continue
            name, label = (s.strip() for s in line.split(","))
            with Image.open(tar.extractfile(members[name.lstrip("./")])) as im:
                im = im.convert("RGB").resize((size + 32, size + 32), Image.BILINEAR)
                images.append(np.asarray(im.crop((16, 16, size + 16, size + 16)), dtype=np.uint8))
            labels.append(int(label))
    arr, lab = np.stack(images), np.asarray(labels, dtype=np.int64)
    atomic_write(cached, lambda p: save_file({"images": arr, "labels": lab}, str(p)))
    return arr, lab


def imagenet_val1300_test(spec: InputSpec) -> EvalSet:
    imgs, labels = _imagenet_uint8(spec.shape[-1])
    n = IMAGENET_TEST_COUNT
    return EvalSet("imagenet-val1300[:1000]", _to_normalized(imgs[:n], spec), torch.from_numpy(labels[:n]))


def imagenet_val1300_pool(spec: InputSpec) -> EvalSet:
    imgs, labels = _imagenet_uint8(spec.shape[-1])
    n = IMAGENET_TEST_COUNT
    return EvalSet("imagenet-val1300[1000:]", _to_normalized(imgs[n:], spec), torch.from_numpy(labels[n:]))
