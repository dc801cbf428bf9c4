"""A folder of your own images as real calibration data or as a test set (``--data``, ``--test-dir``).

Layout as torchvision's ImageFolder: ``DIR/<class>/<image>`` with classes sorted by name giving
labels 0, 1, ...; or a flat folder of images (no labels: calibration only). Decoding uses
Pillow; no torchvision. How an image reaches the model's input size is a stated choice
(``transform``):

- ``auto`` (default): an image already at the input size goes in unchanged; any other gets the
  ImageNet evaluation transform. A CIFAR-sized model fed 32x32 PNGs sees them as they are (the
  old behaviour zoomed them to 37x37 and cropped, and lost points of top-1 for it).
- ``imagenet``: shorter side resized to ``resize_ratio`` (256/224) times the input size, then a
  centre crop: what ImageNet models are evaluated with.
- ``resize``: a plain bilinear resize to the input size (aspect ratio not kept).
- ``none``: every image must already be at the input size; anything else is an error.

Pixels are then scaled to the spec's pixel range and normalised.
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


TRANSFORMS = ("auto", "imagenet", "resize", "none")
DESCRIBED = {"unchanged": "unchanged (already at the input size)",
             "imagenet": "the ImageNet evaluation transform (shorter side to 256/224 of the input size, centre crop)",
             "resize": "a plain resize to the input size"}


def _to_input(path: Path, spec: InputSpec, transform: str, resize_ratio: float) -> tuple[np.ndarray, str]:
    """The image as CHW floats in [0, 1] at the input size, and which transform made it."""
    from PIL import Image

    channels, height, width = spec.shape
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        if im.size == (width, height) and transform in ("auto", "none"):
            done = "unchanged"
        elif transform == "none":
            raise ValueError(f"{path} is {im.size[0]}x{im.size[1]} but the model takes {width}x{height}, and "
                             "transform 'none' leaves images as they are; choose 'imagenet' or 'resize' "
                             "(--image-transform)")
        elif transform == "resize":
            im, done = im.resize((width, height), Image.BILINEAR), "resize"
        else:
            scale = resize_ratio * max(height, width) / min(im.size)
            im = im.resize((max(width, round(im.size[0] * scale)), max(height, round(im.size[1] * scale))),
                           Image.BILINEAR)
            left, top = (im.size[0] - width) // 2, (im.size[1] - height) // 2
            im, done = im.crop((left, top, left + width, top + height)), "imagenet"
        pixels = np.asarray(im, dtype=np.float32) / 255.0
    return (pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)), done


def describe(counts: dict[str, int], transform: str) -> str:
    """One line for the user: which transform each image got."""
    parts = [f"{n} {DESCRIBED[k]}" for k, n in counts.items() if n]
    return f"images: {'; '.join(parts)} [--image-transform {transform}; choices: {', '.join(TRANSFORMS)}]"


def load_image_folder(folder: str | Path, spec: InputSpec, *, limit: int | None = None, transform: str = "auto",
                      resize_ratio: float = 256 / 224) -> EvalSet:
    """The folder's images in the model's normalised input space; labels are -1 without class folders.
    ``transform``: one of TRANSFORMS (module doc); the result's ``note`` says which ran."""
    if transform not in TRANSFORMS:
        raise ValueError(f"image transform {transform!r}; choose one of {', '.join(TRANSFORMS)}")
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
    made = [_to_input(f, spec, transform, resize_ratio) for f in files]
    counts = {k: sum(done == k for _, done in made) for k in DESCRIBED}
    pixels = torch.from_numpy(np.stack([m for m, _ in made])) * (hi - lo) + lo
    return EvalSet(name=folder.name, images=spec.normalize(pixels),
                   labels=torch.tensor(labels if labels is not None else [-1] * len(files)),
                   note=describe(counts, transform))


__all__ = ["TRANSFORMS", "load_image_folder"]
