"""The synthesis methods on a real (tiny, BN) model: each does what its loss says, resumes, and composes."""
from __future__ import annotations

import pytest
import torch

import dfq_plugins
from dfq_plugins.api import calibration_cache_path, make_synthesizer
from dfq_plugins.bench.speed import measure_speed
from dfq_plugins.diffusion import DiffusionLevels
from dfq_plugins.errors import UnsupportedSchemeError
from dfq_plugins.teacher import Teacher

from .conftest import TINY_SPEC, make_tiny, make_trained_tiny
from .test_synthesizers import bn_gap

FAST = {"iterations": 40, "synthesis_batch_size": 16}


def synth(source: dict, n: int = 32, seed: int = 0, trained: bool = False, **kw):
    model = make_trained_tiny() if trained else make_tiny()
    return dfq_plugins.synthesize(model, source, input_spec=TINY_SPEC, num_samples=n, seed=seed,
                                  cache=False, progress=False, **kw)


@pytest.mark.parametrize("name", ["intraq", "hast", "genie", "dynadfq"])
def test_methods_are_deterministic_and_match_bn_statistics_better_than_noise(name):
    config = {"name": name, **FAST, **({"beta": 1.0} if name == "hast" else {})}  # beta 10: CE outweighs BN here
    a = synth(config)
    b = synth(config)
    assert torch.equal(a.images, b.images)
    teacher = Teacher(make_tiny(), TINY_SPEC)
    noise = TINY_SPEC.clip(torch.randn(32, *TINY_SPEC.shape))
    assert bn_gap(teacher, a.images) < bn_gap(teacher, noise)
    assert a.manifest["method"] == name and a.metadata["difficulty"].shape == (32,)


def test_intraq_pulls_the_target_class_probability_to_its_target():
    def gap(weight: float) -> float:
        cs = synth({"name": "intraq", **FAST, "p_low": 0.6, "target_weight": weight}, trained=True)
        p = cs.soft_labels.gather(1, cs.labels[:, None]).squeeze(1)
        return float((p - cs.metadata["target_prob"]).abs().mean())

    assert gap(1.0) < 0.6 * gap(0.0)


def test_hast_images_are_classified_as_their_label():
    cs = synth({"name": "hast", **FAST}, trained=True)
    assert float((cs.soft_labels.argmax(1) == cs.labels).float().mean()) > 0.8


def test_dynadfq_hard_samples_are_harder_than_easy_ones():
    cs = synth({"name": "dynadfq", **FAST, "ce_weight": 1.0, "group_size": 1, "rho_low": 0.4, "rho_high": 0.6}, n=64,
               trained=True)
    hard = cs.metadata["asked_hard"].bool()
    entropy = cs.metadata["difficulty"]
    assert hard.any() and (~hard).any()
    assert float(entropy[hard].mean()) > 1.5 * float(entropy[~hard].mean())


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """IntraQ's class memory is rebuilt from resumed batches, so later batches come out identical."""
    teacher = Teacher(make_tiny(), TINY_SPEC)
    s = make_synthesizer({"name": "intraq", "iterations": 10, "synthesis_batch_size": 8})
    full = s.synthesize(teacher, 24, seed=0, progress=False, workdir=tmp_path)
    (tmp_path / "batch-0002.safetensors").unlink()
    (tmp_path / "batch-0001.safetensors").unlink()
    resumed = make_synthesizer({"name": "intraq", "iterations": 10, "synthesis_batch_size": 8}).synthesize(
        teacher, 24, seed=0, progress=False, workdir=tmp_path)
    assert torch.equal(full.images, resumed.images)
    fresh = make_synthesizer({"name": "intraq", "iterations": 10, "synthesis_batch_size": 8, "hinge_weight": 0.0})
    assert not torch.equal(fresh.synthesize(teacher, 24, seed=0, progress=False).images[8:], full.images[8:])


def test_early_stop_ends_a_batch_on_a_loss_plateau():
    calls = []
    model = make_tiny()
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    dfq_plugins.synthesize(model, {"name": "zeroq", "iterations": 50, "lr": 0.0, "early_stop_patience": 3,
                                   "jitter": 0, "flip": False, "synthesis_batch_size": 8},
                           input_spec=TINY_SPEC, num_samples=8, cache=False, progress=False)
    assert len(calls) < 10  # 4 steps (loss never improves at lr 0) plus labelling


def test_diffdfq_wraps_a_base_and_stores_levels_with_a_quantization_aware_term(tmp_path):
    base = {"name": "intraq", "iterations": 10, "synthesis_batch_size": 16}
    cs = synth({"name": "diffdfq", "base": base, "num_levels": 8})
    plain = synth({"name": "diffdfq", "base": base, "num_levels": 8, "qaware_weight": 0.0})
    assert not torch.equal(cs.images, plain.images)  # the student's BN term moved the pixels
    assert torch.equal(plain.images, synth(base).images)  # without it, exactly the base's images
    levels = DiffusionLevels.of(cs)
    assert len(levels) == 8 and levels.noise_std(7) > levels.noise_std(1) > 0
    teacher = Teacher(make_tiny(), TINY_SPEC)
    keys = {calibration_cache_path(teacher, make_synthesizer({"name": "diffdfq", "base": base,
                                                              "qaware_scheme": s}), 32, 0) for s in ("w4a4", "w8a8")}
    assert len(keys) == 2  # data depends on the student's bit-width, so does the cache key


def test_quantization_aware_term_refuses_a_student_without_batchnorm():
    with pytest.raises(UnsupportedSchemeError, match="BatchNorm"):
        synth({"name": "intraq", "iterations": 2, "qaware_toolchain": "torchao-pt2e", "qaware_weight": 0.01})
    with pytest.raises(ValueError, match="qaware_toolchain"):
        make_synthesizer({"name": "hast", "qaware_weight": 0.01})


def test_speed_runs_every_method_against_the_floor():
    teacher = Teacher(make_tiny(), TINY_SPEC)
    for name in ("intraq", "genie", "diffdfq"):
        row = measure_speed(teacher, make_synthesizer(name), batch=8, iterations=3, repeats=2)
        # a loose bound: the CPU may be shared (CI, a benchmark), and one slow repeat is noise
        assert row["images_x_iterations_per_s"] > 0 and row["ratio_to_floor"] > 0.25, row


@pytest.mark.parametrize("recipe", ["cifar10", "imagenet"])
def test_published_recipes_build_every_method(recipe):
    from pathlib import Path

    from dfq_plugins.recipes import load_recipe

    sources = load_recipe(Path(__file__).parents[1] / "recipes" / "published" / f"{recipe}.toml")["sources"]
    assert set(sources) == {"zeroq", "intraq", "hast", "genie", "dynadfq", "diffdfq"}
    for name, config in sources.items():
        s = make_synthesizer({"name": name, **config})
        assert s.iterations >= 500 and getattr(s, "clip", False) is False, name


def test_set_reaches_a_wrapped_sources_base():
    from dfq_plugins.recipes import apply_overrides

    configs = {"diffdfq": {"base": {"name": "intraq", "lr": 0.5}}}
    apply_overrides(configs, ["diffdfq.base.iterations=7", "diffdfq.num_levels=4"])
    s = make_synthesizer({"name": "diffdfq", **configs["diffdfq"]})
    assert s.iterations == 7 and s.num_levels == 4 and s.config_dict()["base"]["lr"] == 0.5
