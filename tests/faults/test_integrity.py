"""Fault matrix, integrity: damaged partial batches are redone, an edited manifest is refused."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dfq_plugins
from dfq_plugins import CalibrationSet
from dfq_plugins.errors import CorruptArtifactError
from dfq_plugins.io import cache_root

from ..conftest import TINY_SPEC, interrupt_zeroq_once_at_batch, make_tiny

SOURCE = {"name": "zeroq", "iterations": 3, "synthesis_batch_size": 4}


def interrupted_run(monkeypatch) -> list:
    """Synthesize 12 images, stopped (Ctrl-C) in batch 2: batches 0 and 1 are left in .partial."""
    calls = interrupt_zeroq_once_at_batch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        dfq_plugins.synthesize(make_tiny(), SOURCE, input_spec=TINY_SPEC, num_samples=12, progress=False)
    return calls


def partial_batch(index: int):
    (partial,) = (cache_root() / "calibration").glob("*.partial")
    return partial / f"batch-{index:04d}.safetensors"


@pytest.mark.parametrize("damage", ["bit-flip", "nan", "unhashed"])
def test_a_damaged_partial_batch_is_redone_not_trusted(monkeypatch, damage):
    calls = interrupted_run(monkeypatch)
    path = partial_batch(1)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    images = load_file(str(path))["images"]
    if damage == "bit-flip":
        images.view(torch.int32)[0, 0, 0, 0] ^= 1 << 20
    elif damage == "nan":
        images[0, 0, 0, 0] = float("nan")
    save_file({"images": images}, str(path), metadata=None if damage == "unhashed" else meta)
    with pytest.warns(UserWarning, match="integrity check"):
        resumed = dfq_plugins.synthesize(make_tiny(), SOURCE, input_spec=TINY_SPEC, num_samples=12, progress=False)
    assert calls == [0, 1, 2, 1, 2]  # batch 0 reused, batch 1 redone
    fresh = dfq_plugins.synthesize(make_tiny(), SOURCE, input_spec=TINY_SPEC, num_samples=12, cache=False,
                                   progress=False)
    assert resumed.content_hash() == fresh.content_hash()


def edit_header(path, edit) -> None:
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["dfq_manifest"])
    edit(header)
    save_file(tensors, str(path), metadata={"dfq_manifest": json.dumps(header)})


def saved_set(tmp_path):
    cs = CalibrationSet(torch.randn(8, *TINY_SPEC.shape), batch_size=4, manifest={"input_spec": TINY_SPEC.to_dict()})
    return cs.save(tmp_path / "set.safetensors")


def test_an_edited_manifest_is_refused(tmp_path):
    path = saved_set(tmp_path)
    edit_header(path, lambda h: h["manifest"]["input_spec"].update(mean=[0.0, 0.0, 0.0]))
    with pytest.raises(CorruptArtifactError, match="header hash mismatch"):
        CalibrationSet.load(path)


def cached_unsigned_set(edit=None):
    """A set synthesized into the cache, then stripped of its header hash as older versions wrote it
    (and, with ``edit``, its manifest changed as well)."""
    cs = dfq_plugins.synthesize(make_tiny(), SOURCE, input_spec=TINY_SPEC, num_samples=8, progress=False)
    (path,) = (cache_root() / "calibration").glob("*.safetensors")
    edit_header(path, lambda h: (h.pop("header_hash"), edit and edit(h)))
    return cs, path


def test_an_older_set_whose_manifest_matches_its_key_is_reused_and_re_signed():
    made, path = cached_unsigned_set()
    with pytest.warns(UserWarning, match="older dfq-plugins"):
        CalibrationSet.load(path)
    again = dfq_plugins.synthesize(make_tiny(), SOURCE, input_spec=TINY_SPEC, num_samples=8, progress=False)
    assert again.content_hash() == made.content_hash()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CalibrationSet.load(path)  # upgraded: signed now, no warning


def test_an_edited_unsigned_manifest_is_never_re_signed_and_the_set_is_made_afresh():
    """The defect: an unsigned set with an edited manifest (mean 9, std 0.001) was reused and re-signed."""
    made, path = cached_unsigned_set(lambda h: h["manifest"]["input_spec"].update(mean=[9.0] * 3, std=[0.001] * 3))
    with pytest.warns(UserWarning, match="does not say what its cache key stands for .*input_spec"):
        again = dfq_plugins.synthesize(make_tiny(), SOURCE, input_spec=TINY_SPEC, num_samples=8, progress=False)
    assert again.manifest["input_spec"] == TINY_SPEC.to_dict() and again.content_hash() == made.content_hash()
    assert CalibrationSet.load(path).manifest["input_spec"]["mean"] == list(TINY_SPEC.mean)  # a fresh, signed set
    assert path.with_name(path.name + ".rejected").exists()  # the suspect file is kept aside, not re-signed


def test_a_crafted_test_archive_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """The defect: a crafted .npz test set was refused only after quantization had run."""
    import numpy as np

    from dfq_plugins import api
    from dfq_plugins.cli import main
    from dfq_plugins.models.assets import asset

    try:
        weights = asset("cifar10/resnet20-12fca82f.th")
    except Exception as exc:  # noqa: BLE001 - the assets are optional
        pytest.skip(f"evaluation assets absent: {exc}")
    root = tmp_path / "assets" / "cifar10"
    root.mkdir(parents=True)
    (root / "resnet20-12fca82f.th").symlink_to(weights)
    np.savez(root / "test932_lossless.npz", images=np.array([{"code": 1}], dtype=object), labels=np.zeros(1))
    monkeypatch.setenv("DFQ_ASSETS", str(tmp_path / "assets"))
    monkeypatch.setattr(api, "_synthesize_now", lambda *a, **k: pytest.fail("synthesis ran before the check"))
    assert main(["quantize", "--model", "cifar10-resnet20", "--images", "8", "--quiet"]) == 2
    assert "test932_lossless.npz is not a plain image archive" in capsys.readouterr().err


class MeanPooledTiny(type(make_tiny())):
    """The same weights written another way (pooling by ``mean``): another graph, the same state_dict."""

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def test_a_checkpoint_of_another_graph_with_the_same_weights_is_never_resumed(tmp_path):
    """Two ways of writing one model share the teacher's fingerprint; the second run's reconstruct
    once resumed the first's checkpoint and stopped in load_state_dict with a traceback."""
    first = make_tiny()
    second = MeanPooledTiny()
    second.load_state_dict(first.state_dict())
    source = CalibrationSet(torch.rand(8, 3, 16, 16), batch_size=4)
    run = {"toolchain": "torch-ao-fx", "source": source, "scheme": "w4a4", "input_spec": TINY_SPEC, "progress": False,
           "distill": {"name": "reconstruct", "steps": 2, "batch_size": 4}}
    for model in (first, second):
        q = dfq_plugins.quantize(model.eval(), **run)
        assert torch.isfinite(q(torch.rand(2, 3, 16, 16))).all()
    assert len(list((cache_root() / "distill").glob("reconstruct-*"))) == 2


def test_a_checkpoint_that_does_not_fit_is_refused_before_anything_is_loaded(tmp_path):
    from dfq_plugins.distillers.checkpoint import load_checkpoint, save_checkpoint

    small, big = torch.nn.Linear(3, 2), torch.nn.Linear(3, 4)
    before = {k: v.clone() for k, v in small.state_dict().items()}
    save_checkpoint(tmp_path / "c.safetensors", key="k", step=1, elapsed=0.0, modules={"student": big},
                    optimizers={}, extra={})
    with pytest.raises(CorruptArtifactError, match="another model.*delete it"):
        load_checkpoint(tmp_path / "c.safetensors", key="k", modules={"student": small}, optimizers={})
    assert all(torch.equal(before[k], v) for k, v in small.state_dict().items())


def test_an_input_spec_where_the_batch_size_goes_is_a_clear_error():
    with pytest.raises(TypeError, match="batch_size must be an int, got InputSpec"):
        CalibrationSet(torch.rand(4, 3, 16, 16), TINY_SPEC)
