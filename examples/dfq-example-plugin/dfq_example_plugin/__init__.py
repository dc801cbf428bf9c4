"""An example synthesizer plugin: low-pass filtered Gaussian noise."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dfq_plugins import hookimpl
from dfq_plugins.synthesizers.base import Synthesizer, seeded_generator


@dataclass
class SmoothNoiseSynthesizer(Synthesizer):
    """Gaussian noise blurred by a box filter of ``kernel`` pixels, rescaled to unit variance."""

    name = "smooth-noise"
    kernel: int = 3

    def synthesize(self, teacher, num_samples, *, seed=0, batch_size=32, progress=True, workdir=None):
        x = torch.randn((num_samples, *teacher.spec.shape), generator=seeded_generator(seed))
        x = F.avg_pool2d(x, self.kernel, stride=1, padding=self.kernel // 2, count_include_pad=False)
        x = x / x.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)
        return self.finish(teacher, x, seed, batch_size)


@hookimpl
def dfq_register_synthesizers(register):
    register("smooth-noise", SmoothNoiseSynthesizer)
