"""A folder of your own images as real calibration data or as a test set (``--data``, ``--test-dir``).

Layout as torchvision's ImageFolder: ``DIR/<class>/<image>`` with classes sorted by name giving
labels 0, 1, ...; or a flat folder of images (no labels: calibration only). Each image is
resized so its shorter side is ``resize_ratio`` times the model's input size, centre-cropped to
the input size, scaled to the spec's pixel range and normalised (the usual ImageNet evaluation
transform with ratio 256/224). Decoding uses Pillow; no torchvision.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .models.base import EvalSet
from .spec import InputSpec

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}


def _files(folder: Path) -> tuple[list[Path], list[int] | None, list[str]]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        files, labels = [], []
        for index, name in enumerate(classes):
            for f in sorted((folder / name).rglob("*")):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(f)
                    labels.append(index)
        return files, labels, classes
    return sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES), None, []


def _to_input(path: Path, spec: InputSpec, resize_ratio: float) -> np.ndarray:
    from PIL import Image

    channels, height, width = spec.shape
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        scale = resize_ratio * max(height, width) / min(im.size)
        im = im.resize((max(width, round(im.size[0] * scale)), max(height, round(im.size[1] * scale))),
                       Image.BILINEAR)
        left, top = (im.size[0] - width) // 2, (im.size[1] - height) // 2
        pixels = np.asarray(im.crop((left, top, left + width, top + height)), dtype=np.float32) / 255.0
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def load_image_folder(folder: str | Path, spec: InputSpec, *, limit: int | None = None,
                      resize_ratio: float = 256 / 224) -> EvalSet:
    """The folder's images in the model's normalised input space; labels are -1 without class folders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no image folder at {folder}")
    if spec.channels not in (1, 3):
        raise ValueError(f"an image folder feeds 1- or 3-channel models; this one takes {spec.channels} channels")
    files, labels, classes = _files(folder)
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}), directly or in class "
                         "sub-folders")
    if labels is not None and len(classes) > spec.num_classes:
        raise ValueError(f"{folder} has {len(classes)} class folders but the model has {spec.num_classes} classes")
    if limit is not None:
        files, labels = files[:limit], None if labels is None else labels[:limit]
    lo, hi = spec.pixel_range
    pixels = torch.from_numpy(np.stack([_to_input(f, spec, resize_ratio) for f in files])) * (hi - lo) + lo
    return EvalSet(name=folder.name, images=spec.normalize(pixels),
                   labels=torch.tensor(labels if labels is not None else [-1] * len(files)))


__all__ = ["load_image_folder"]
