"""The quantized student of DiffDFQ's quantization-aware BN term, built by a toolchain plugin.

The student is the toolchain's own trainable fake-quant model (``prepare_qat_fx`` keeps each
BatchNorm as the ``bn`` child of its ConvBn module, so BN inputs stay observable), calibrated
once on clipped noise and then kept in train mode so that activation observers keep tracking
(EMA) the images being synthesized. Its weights never train here.
"""
from __future__ import annotations

import torch
from torch import nn

from ..data import CalibrationSet
from ..errors import UnsupportedSchemeError
from ..scheme import QuantScheme
from ..teacher import Teacher
from .base import seeded_generator
from .bn_stats import batchnorm_modules


def quantized_student(teacher: Teacher, toolchain: str, scheme: str, warmup_images: int = 32) -> nn.Module:
    from ..api import make_toolchain

    chain = make_toolchain(toolchain)
    q_scheme = QuantScheme.parse(scheme)
    chain.check_scheme(q_scheme)
    noise = teacher.spec.clip(torch.randn((warmup_images, *teacher.spec.shape), generator=seeded_generator(0, 7)))
    student = chain.quantize(teacher.model, q_scheme, CalibrationSet(noise, batch_size=warmup_images),
                             trainable=True)
    n_student, n_teacher = len(batchnorm_modules(student)), len(teacher.bn_layers())
    if n_student != n_teacher:
        raise UnsupportedSchemeError(
            f"the quantization-aware BN term needs the student's BatchNorm layers, but {toolchain}'s trainable "
            f"model has {n_student} where the teacher has {n_teacher} (BN folded away). Use qaware_toolchain="
            "'torch-ao-fx', or set qaware_weight=0"
        )
    for p in student.parameters():
        p.requires_grad_(False)
    return student.train()


__all__ = ["quantized_student"]
