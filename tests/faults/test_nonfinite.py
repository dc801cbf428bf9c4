"""Fault matrix, non-finite values: a damaged model, a diverged synthesis or a NaN set stops with
a clear error, and nothing non-finite is ever written to the cache or read back from it."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import dfq_plugins
from dfq_plugins import CalibrationSet
from dfq_plugins.api import make_distiller
from dfq_plugins.errors import CorruptArtifactError, NonFiniteError
from dfq_plugins.io import tensors_hash
from dfq_plugins.teacher import Teacher

from ..conftest import TINY_SPEC, make_tiny, make_trained_tiny
from ..test_distillers import calibration_set, student_for


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DFQ_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def cached_files(cache):
    return [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []


@pytest.mark.parametrize("source", ["zeroq", "genie", "intraq"])
def test_a_negative_bn_variance_is_named_before_synthesis(cache, source):
    model = make_tiny()
    model.bn2.running_var[3] = -1.0
    with pytest.raises(NonFiniteError, match=r"BatchNorm 'bn2' has a negative running_var at channel 3"):
        dfq_plugins.synthesize(model, source, input_spec=TINY_SPEC, num_samples=8, progress=False)
    assert cached_files(cache) == []


def test_a_nan_bn_mean_is_named_before_synthesis(cache):
    model = make_tiny()
    model.bn1.running_mean[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"'bn1.running_mean' holds a non-finite value at index \[0\]"):
        dfq_plugins.synthesize(model, "zeroq", input_spec=TINY_SPEC, num_samples=8, progress=False)
    assert cached_files(cache) == []


def test_a_diverged_synthesis_stops_and_caches_nothing(cache, monkeypatch):
    """An optimisation that ends in NaN (here forced): the batch is refused before it is written."""
    from dfq_plugins.synthesizers.zeroq import ZeroQSynthesizer

    original = ZeroQSynthesizer.optimize_batch
    monkeypatch.setattr(ZeroQSynthesizer, "optimize_batch", lambda *a, **k: original(*a, **k) * float("nan"))
    with pytest.raises(NonFiniteError, match="synthesis batch 0"):
        dfq_plugins.synthesize(make_tiny(), {"name": "zeroq", "iterations": 2}, input_spec=TINY_SPEC,
                               num_samples=8, progress=False)
    assert not any(p.suffix == ".safetensors" for p in cached_files(cache))


def test_a_set_with_nan_is_never_saved(tmp_path):
    images = torch.randn(8, *TINY_SPEC.shape)
    images[2, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="inputs.x"):
        CalibrationSet(images, batch_size=4).save(tmp_path / "set.safetensors")
    assert not (tmp_path / "set.safetensors").exists()


def test_a_crafted_file_with_nan_and_a_valid_hash_is_refused_on_load(tmp_path):
    tensors = {"inputs.x": torch.full((4, *TINY_SPEC.shape), float("nan"))}
    header = {"format_version": 1, "input_kind": "tensor", "batch_size": 4, "num_samples": 4,
              "content_hash": tensors_hash(tensors), "manifest": {}}
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata={"dfq_manifest": json.dumps(header)})
    with pytest.raises(CorruptArtifactError, match="NaN or infinite values in"):
        CalibrationSet.load(tmp_path / "nan.safetensors")


def test_a_nan_loss_stops_distillation_before_any_update(tmp_path):
    chain, student = student_for(make_trained_tiny())
    before = {k: v.clone() for k, v in student.state_dict().items()}
    cs = calibration_set()
    bad = CalibrationSet(torch.full_like(cs.images, float("nan")), batch_size=16)
    kd = make_distiller({"name": "kd", "checkpoint_every": 0}, steps=3)
    with pytest.raises(NonFiniteError, match="the student loss is nan at step 0"):
        kd.distill(Teacher(make_trained_tiny(), TINY_SPEC), student, bad, toolchain=chain, progress=False,
                   workdir=tmp_path, key="k")
    weights = [k for k in before if k.endswith("weight")]
    assert weights and all(torch.equal(before[k], student.state_dict()[k]) for k in weights)
