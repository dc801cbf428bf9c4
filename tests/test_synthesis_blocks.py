"""The shared synthesis building blocks: BN statistics, labels, augmentation, class memory, diffusion."""
from __future__ import annotations

import pytest
import torch

from dfq_plugins.data import CalibrationSet
from dfq_plugins.diffusion import DiffusionLevels, linear_alphas_bar
from dfq_plugins.synthesizers.augment import SynthesisAugment
from dfq_plugins.synthesizers.bn_stats import (
    BNStatsLoss,
    BNStatsRecorder,
    LayerStats,
    running_targets,
)
from dfq_plugins.synthesizers.labels import (
    class_similarity,
    similar_class_targets,
    target_probability_targets,
)
from dfq_plugins.synthesizers.memory import ClassCentreMemory, cosine_hinge
from dfq_plugins.teacher import Teacher

from .conftest import TINY_SPEC, make_tiny


def test_recorder_gives_batch_and_per_sample_statistics_and_removes_its_hooks():
    teacher = Teacher(make_tiny(), TINY_SPEC)
    bns = [m for _, m in teacher.bn_layers()]
    seen = []
    x = torch.randn(6, *TINY_SPEC.shape)
    handle = bns[0].register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    batch, per_sample = BNStatsRecorder(bns, "var"), BNStatsRecorder(bns, "std", per_sample=True)
    with batch.record(), per_sample.record():
        teacher(x)
    handle.remove()
    var, mean = torch.var_mean(seen[0], dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(batch.stats[0].mean, mean, atol=1e-5) and torch.allclose(batch.stats[0].spread, var, atol=1e-5)
    assert per_sample.stats[1].mean.shape == (6, 16) and len(batch.stats) == 2
    assert all(not m._forward_pre_hooks for m in bns)


def test_bn_loss_distances_margin_and_layer_weights():
    stats = [LayerStats(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0]))]
    goal = [LayerStats(torch.zeros(2), torch.ones(2))]
    assert float(BNStatsLoss("l2")(stats, goal)) == pytest.approx(10.0)
    assert float(BNStatsLoss("mse")(stats, goal)) == pytest.approx(5.0)
    assert float(BNStatsLoss("l2_per_channel")(stats, goal)) == pytest.approx(5.0)
    assert float(BNStatsLoss("l2", margin=1.0)(stats, goal)) == pytest.approx(4.0)  # only 3 exceeds the slack
    w = BNStatsLoss(layer_weighting="first_layer_multiplier", first_layer_multiplier=3.0).layer_weights(3)
    assert torch.allclose(w, torch.tensor([0.6, 0.2, 0.2]))
    with pytest.raises(RuntimeError, match="different set of BN layers"):
        BNStatsLoss()(stats, goal * 2)
    with pytest.raises(ValueError, match="distance"):
        BNStatsLoss("l1")


def test_relative_bn_distance_weighs_every_layer_alike_whatever_its_scale():
    """A layer whose activations are 100x larger costs 10^4x more under l2 and the same under relative,
    so wide, large-valued late layers cannot drown the early ones (Lite0's zeroq fit)."""
    def layer(c: float) -> tuple[LayerStats, LayerStats]:
        return (LayerStats(torch.tensor([1.0, 3.0]) * c, torch.tensor([2.0, 2.0]) * c),
                LayerStats(torch.zeros(2), torch.full((2,), 2.0 * c)))
    (s1, t1), (s2, t2) = layer(1.0), layer(100.0)
    rel, l2 = BNStatsLoss("relative", layer_weighting="sum"), BNStatsLoss("l2", layer_weighting="sum")
    assert float(rel([s1], [t1])) == pytest.approx(float(rel([s2], [t2])))
    assert float(rel([s1], [t1])) == pytest.approx(((0.5 ** 2 + 1.5 ** 2) / 2))  # the means' z-scores
    assert float(l2([s2], [t2])) == pytest.approx(1e4 * float(l2([s1], [t1])))


def test_running_targets_are_the_teachers_running_statistics():
    teacher = Teacher(make_tiny(), TINY_SPEC)
    bns = [m for _, m in teacher.bn_layers()]
    t = running_targets(bns, "std")
    assert torch.allclose(t[1].spread, torch.sqrt(bns[1].running_var + bns[1].eps))


def test_target_probability_labels_constrain_a_fraction():
    g = torch.Generator().manual_seed(0)
    t = target_probability_targets(2000, 10, g, p_low=0.6, fraction=0.5)
    soft = t.target_prob < 1
    assert 0.45 < soft.float().mean() < 0.55 and float(t.target_prob.min()) >= 0.6
    assert torch.allclose(t.soft.sum(1), torch.ones(2000))
    assert torch.equal(t.soft.gather(1, t.labels[:, None]).squeeze(1), t.target_prob)


def test_similar_class_labels_spread_hard_mass_over_the_most_similar_classes():
    w = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    sim = class_similarity(w, "cosine")
    g = torch.Generator().manual_seed(0)
    t = similar_class_targets(400, sim, g, hard_fraction=0.5, group_size=1, rho_range=(0.5, 0.7))
    hard = t.hard_mask
    assert 0.4 < hard.float().mean() < 0.6
    assert torch.equal(t.soft[~hard].argmax(1), t.labels[~hard]) and torch.all(t.soft[~hard].max(1).values == 1)
    class0 = hard & (t.labels == 0)
    assert torch.all(t.soft[class0, 1] > 0.29) and torch.all(t.soft[class0, 2:] == 0)  # 1 is 0's neighbour
    assert not torch.equal(class_similarity(w * torch.tensor([[1.0], [5.0], [1.0], [1.0]]), "dot"),
                           class_similarity(w, "dot"))


def test_augmentation_keeps_shape_and_is_off_when_gated_off():
    x = torch.randn(4, 3, 16, 16)
    aug = SynthesisAugment(flip=True, crop_scale=0.5, prob=1.0)
    out = aug(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and not torch.equal(out, x)
    assert torch.equal(SynthesisAugment(flip=True, crop_scale=0.5, prob=0.0)(x, torch.Generator()), x)


def test_class_memory_and_cosine_hinge():
    mem = ClassCentreMemory(3)
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mem.update(feats, torch.tensor([0, 0]))
    centres, known = mem.centres(torch.tensor([0, 1]))
    assert known.tolist() == [True, False] and torch.allclose(centres[0], torch.tensor([0.5, 0.5]))
    same = torch.tensor([[1.0, 1.0], [5.0, 5.0]])  # distance 0 to class 0's centre
    assert float(cosine_hinge(same, centres, known, m_low=0.1, m_up=1.0)) == pytest.approx(0.1)
    assert float(cosine_hinge(same, centres, known, m_low=0.0, m_up=1.0)) == 0.0


def test_diffusion_levels_are_stored_reproducible_and_survive_save(tmp_path):
    abar = linear_alphas_bar(1e-4, 0.02, 79)
    assert abar[0] == 1 and (1 - abar[10]) ** 0.5 == pytest.approx(0.111, abs=1e-3)  # methods.md 5.3
    x = torch.randn(8, 3, 4, 4)
    cs = CalibrationSet(x.clone(), 4)
    levels = DiffusionLevels.attach(cs, num_levels=20, noise_seed=3)
    assert torch.equal(levels.images(0), x)
    noisy = levels.level(10)
    assert float((noisy.inputs - x).std()) == pytest.approx(0.111, rel=0.3) and "diffusion_noise" not in noisy.metadata
    cs.save(tmp_path / "d.safetensors")
    again = DiffusionLevels.of(CalibrationSet.load(tmp_path / "d.safetensors"))
    assert torch.equal(again.images(10), levels.images(10))
    per_level = DiffusionLevels.attach(CalibrationSet(x.clone(), 4), num_levels=5, mode="per_level")
    assert torch.equal(per_level.images(3), per_level.images(3))
    resample = DiffusionLevels.attach(CalibrationSet(x.clone(), 4), num_levels=5, mode="resample")
    assert not torch.equal(resample.images(3), resample.images(3))
    with pytest.raises(ValueError, match="no diffusion levels"):
        DiffusionLevels.of(CalibrationSet(x, 4))
