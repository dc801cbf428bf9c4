"""Data sources on real models: determinism, BN inversion doing its job, clear errors, resume."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dfq_plugins
from dfq_plugins.errors import MissingBatchNormError
from dfq_plugins.spec import InputSpec
from dfq_plugins.synthesizers.zeroq import ZeroQSynthesizer
from dfq_plugins.teacher import Teacher

from .conftest import interrupt_zeroq_once_at_batch, make_tiny


def bn_gap(teacher: Teacher, x: torch.Tensor) -> float:
    """Mean squared gap between BN-input batch statistics and the running statistics."""
    gaps = []

    def record(i, inp):
        var, mean = torch.var_mean(inp, dim=(0, 2, 3), unbiased=False)
        bn = bns[i]
        gaps.append(((mean - bn.running_mean) ** 2).mean() + ((var - bn.running_var) ** 2).mean())

    bns = [m for _, m in teacher.bn_layers()]
    with torch.no_grad(), teacher.forward_pre_hooks(bns, record):
        teacher(x)
    return float(torch.stack(gaps).mean())


def test_noise_is_deterministic_per_seed(tiny):
    model, spec = tiny
    a = dfq_plugins.synthesize(model, "noise", input_spec=spec, num_samples=16, seed=1, cache=False)
    b = dfq_plugins.synthesize(model, "noise", input_spec=spec, num_samples=16, seed=1, cache=False)
    c = dfq_plugins.synthesize(model, "noise", input_spec=spec, num_samples=16, seed=2, cache=False)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert a.soft_labels.shape == (16, 4) and torch.allclose(a.soft_labels.sum(1), torch.ones(16))


@pytest.mark.compat
def test_zeroq_matches_bn_statistics_better_than_noise(tiny):
    model, spec = tiny
    teacher = Teacher(model, spec)
    zq = ZeroQSynthesizer(iterations=60, lr=0.2, synthesis_batch_size=64, smoothing=False, flip=False, jitter=0)
    images = zq.synthesize(teacher, 64, seed=0, progress=False).images
    noise = torch.randn(64, *spec.shape)
    assert bn_gap(teacher, images) < 0.3 * bn_gap(teacher, noise)
    lo, hi = spec.bounds()
    assert torch.all(images >= lo - 1e-6) and torch.all(images <= hi + 1e-6)  # clipped to real pixels


def test_zeroq_same_seed_same_set_and_cache_hit(tiny, monkeypatch):
    model, spec = tiny
    src = {"name": "zeroq", "iterations": 5}
    a = dfq_plugins.synthesize(model, src, input_spec=spec, num_samples=8, seed=0, progress=False)
    calls = []
    monkeypatch.setattr(ZeroQSynthesizer, "optimize_batch", lambda *a, **k: calls.append(1))
    b = dfq_plugins.synthesize(model, src, input_spec=spec, num_samples=8, seed=0, batch_size=4)
    assert not calls, "second call must come from the cache"
    assert torch.equal(a.images, b.images) and b.batch_size == 4
    assert b.manifest["method"] == "zeroq" and b.manifest["config"]["iterations"] == 5


def test_zeroq_without_batchnorm_names_the_sources_that_work():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    spec = InputSpec((3, 8, 8), (0.0,) * 3, (1.0,) * 3, 2)
    with pytest.raises(MissingBatchNormError, match="noise, real"):
        dfq_plugins.synthesize(model, "zeroq", input_spec=spec, num_samples=4)


def test_zeroq_takes_any_channel_count_and_untraceable_forward():
    class Gray(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_tiny(channels=1)

        def forward(self, x):
            if x.mean() > 100:  # data-dependent control flow: symbolic tracing would fail
                x = x * 0
            return self.net(x)

    spec = InputSpec((1, 16, 16), (0.5,), (0.25,), 4)
    cs = dfq_plugins.synthesize(Gray(), {"name": "zeroq", "iterations": 3}, input_spec=spec, num_samples=4,
                                progress=False)
    assert cs.images.shape == (4, 1, 16, 16)


def test_interrupted_synthesis_resumes_from_finished_batches(tiny, monkeypatch):
    model, spec = tiny
    src = {"name": "zeroq", "iterations": 3, "synthesis_batch_size": 4}
    calls = interrupt_zeroq_once_at_batch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        dfq_plugins.synthesize(model, src, input_spec=spec, num_samples=12, progress=False)
    resumed = dfq_plugins.synthesize(model, src, input_spec=spec, num_samples=12, progress=False)
    assert calls == [0, 1, 2, 2]  # batches 0 and 1 were not recomputed
    fresh = dfq_plugins.synthesize(model, src, input_spec=spec, num_samples=12, cache=False, progress=False)
    assert torch.allclose(resumed.images, fresh.images)


def test_real_source_samples_by_seed_and_keeps_labels(tiny):
    model, spec = tiny
    images, labels = torch.randn(20, *spec.shape), torch.arange(20) % 4
    a = dfq_plugins.synthesize(model, "real", input_spec=spec, num_samples=8, seed=0, data=(images, labels))
    idx = [int((images == row).all(dim=(1, 2, 3)).nonzero()) for row in a.images]
    assert torch.equal(a.labels, labels[idx])
    with pytest.raises(ValueError, match="fewer than"):
        dfq_plugins.synthesize(model, "real", input_spec=spec, num_samples=30, data=(images, labels))


def test_teacher_hooks_are_removed_even_on_error(tiny):
    model, spec = tiny
    t = Teacher(model, spec)
    with pytest.raises(RuntimeError):
        with t.forward_pre_hooks([m for _, m in t.bn_layers()], lambda i, x: None):
            raise RuntimeError("boom")
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())


def test_synthesize_gives_the_users_model_back_as_it_was(tiny):
    model, spec = tiny
    model.train()
    dfq_plugins.synthesize(model, {"name": "zeroq", "iterations": 2}, input_spec=spec, num_samples=4,
                           progress=False)
    assert model.training and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_channel_stats_match_var_mean_with_exact_gradients(layout):
    from dfq_plugins.losses import channel_stats

    x = torch.randn(4, 3, 5, 6, dtype=torch.double).contiguous(memory_format=layout).requires_grad_(True)
    mean, var = channel_stats(x)
    ref_var, ref_mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(mean, ref_mean) and torch.allclose(var, ref_var)
    assert torch.autograd.gradcheck(channel_stats, (x,))


def test_channels_last_synthesis_matches_and_restores_layout():
    model = make_tiny()
    spec = InputSpec((3, 16, 16), (0.5,) * 3, (0.25,) * 3, 4)
    teacher = Teacher(model, spec)
    a = ZeroQSynthesizer(iterations=3, channels_last=True).synthesize(teacher, 8, progress=False).images
    b = ZeroQSynthesizer(iterations=3, channels_last=False).synthesize(teacher, 8, progress=False).images
    assert torch.allclose(a, b, atol=1e-4)
    assert a.is_contiguous() and model.conv1.weight.is_contiguous()


def test_config_holds_only_data_knobs():
    """Class-level settings never leak into configs (and so into cache keys and bench records)."""
    from dfq_plugins.synthesizers.simple import NoiseSynthesizer

    assert NoiseSynthesizer().config_dict() == {"mean": 0.0, "std": 1.0, "clip": False}
    cfg = ZeroQSynthesizer().config_dict()
    assert "channels_last" not in cfg and "speed_only_fields" not in cfg and cfg["iterations"] == 200


def test_real_source_reads_a_dataloader(tiny):
    """Your own data as it usually comes: a DataLoader of (images, labels)."""
    from torch.utils.data import DataLoader, TensorDataset

    model, spec = tiny
    images, labels = torch.randn(40, *spec.shape), torch.arange(40) % 4
    loader = DataLoader(TensorDataset(images, labels), batch_size=16, shuffle=False)
    cs = dfq_plugins.synthesize(model, "real", input_spec=spec, num_samples=24, data=loader, progress=False)
    assert cs.num_samples == 24
    rows = [int((images == row).all(dim=(1, 2, 3)).nonzero()) for row in cs.images]
    assert all(r < 32 for r in rows)  # read only the two batches it needed
    assert torch.equal(cs.labels, labels[rows])
    q = dfq_plugins.quantize(model, toolchain="torch-ao-fx", source="real", data=loader, input_spec=spec,
                             num_samples=16, progress=False)
    assert q(images[:2]).shape == (2, 4)


def test_real_source_reads_a_dataloader_of_images_only(tiny):
    """A TensorDataset of images alone yields one-element lists, not (images, labels)."""
    from torch.utils.data import DataLoader, TensorDataset

    model, spec = tiny
    images = torch.randn(20, *spec.shape)
    cs = dfq_plugins.synthesize(model, "real", input_spec=spec, num_samples=12,
                                data=DataLoader(TensorDataset(images), batch_size=8), progress=False)
    rows = [int((images == row).all(dim=(1, 2, 3)).nonzero()) for row in cs.images]
    assert cs.num_samples == 12 and all(r < 16 for r in rows) and len(set(rows)) == 12
