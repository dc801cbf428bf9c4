"""Fault matrix, cache location: a bad cache is a clear error before work, a disk that fails at
the end never loses the result, and temporaries of killed runs are cleaned."""
from __future__ import annotations

import errno
import os
import time

import pytest
import torch

import dfq_plugins
from dfq_plugins import io
from dfq_plugins.api import make_distiller
from dfq_plugins.io import CacheLocationError
from dfq_plugins.synthesizers.zeroq import ZeroQSynthesizer

from ..conftest import TINY_SPEC, make_tiny, make_trained_tiny
from ..test_distillers import calibration_set, student_for

SOURCE = {"name": "zeroq", "iterations": 2}


@pytest.fixture
def no_synthesis(monkeypatch):
    """Fail the test if any batch is synthesized: errors must come before the work."""
    def forbidden(*_a, **_k):
        raise AssertionError("synthesis started before the cache was checked")
    monkeypatch.setattr(ZeroQSynthesizer, "optimize_batch", forbidden)


def test_a_cache_path_that_is_a_file_is_a_clear_error_before_work(tmp_path, monkeypatch, no_synthesis):
    (tmp_path / "cachefile").write_text("not a folder")
    monkeypatch.setenv("DFQ_CACHE", str(tmp_path / "cachefile"))
    with pytest.raises(CacheLocationError, match="set DFQ_CACHE to a writable folder"):
        dfq_plugins.synthesize(make_tiny(), SOURCE, input_spec=TINY_SPEC, num_samples=8, progress=False)


def deny_writes(monkeypatch):
    def denied(*_a, **_k):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(io.tempfile, "mkstemp", denied)


def test_a_read_only_cache_is_a_clear_error_before_work(monkeypatch, no_synthesis):
    deny_writes(monkeypatch)
    with pytest.raises(CacheLocationError, match=r"cannot write to the cache folder .*PermissionError"):
        dfq_plugins.synthesize(make_tiny(), SOURCE, input_spec=TINY_SPEC, num_samples=8, progress=False)


def test_a_read_only_cache_still_serves_what_it_holds(monkeypatch):
    first = dfq_plugins.synthesize(make_tiny(), SOURCE, input_spec=TINY_SPEC, num_samples=8, progress=False)
    deny_writes(monkeypatch)
    again = dfq_plugins.synthesize(make_tiny(), SOURCE, input_spec=TINY_SPEC, num_samples=8, progress=False)
    assert again.content_hash() == first.content_hash()


def test_a_disk_that_fails_during_distillation_still_returns_the_trained_student(tmp_path, monkeypatch):
    chain, student = student_for(make_trained_tiny())
    before = {k: v.clone() for k, v in student.state_dict().items()}
    kd = make_distiller({"name": "kd", "lr": 0.01, "checkpoint_every": 5}, steps=12)
    deny_writes(monkeypatch)  # after the start: every checkpoint, the final one included, fails
    with pytest.warns(UserWarning, match="could not write the checkpoint"):
        out = kd.distill(dfq_plugins.teacher.Teacher(make_trained_tiny(), TINY_SPEC), student, calibration_set(),
                         toolchain=chain, progress=False, workdir=tmp_path / "run", key="k")
    assert kd.last_run.step == 12
    assert any(not torch.equal(before[k], v) for k, v in out.state_dict().items() if k.endswith("weight"))


def test_a_distillation_into_a_read_only_cache_is_refused_before_training(monkeypatch):
    model = make_trained_tiny()
    _, student = student_for(model)
    deny_writes(monkeypatch)
    with pytest.raises(CacheLocationError, match="cannot write"):
        dfq_plugins.distill(model, student, calibration_set(), distiller="kd", toolchain="torch-ao-fx",
                            scheme="w4a4", input_spec=TINY_SPEC, steps=3, progress=False)


def test_temporaries_of_killed_runs_are_removed_and_live_ones_kept(tmp_path):
    folder = tmp_path / "calibration"
    folder.mkdir()
    orphan = folder / ".zeroq-abc.safetensors.x1y2.tmp"
    orphan.write_bytes(b"\0" * 1024)
    old = time.time() - 3600
    os.utime(orphan, (old, old))
    live = folder / ".zeroq-def.safetensors.z3w4.tmp"
    live.write_bytes(b"\0")  # written now, by a run that may still be going
    kept = folder / "zeroq-abc.safetensors"
    kept.write_bytes(b"data")
    os.utime(kept, (old, old))
    io.writable_folder(folder)
    assert not orphan.exists() and live.exists() and kept.exists()


def test_the_nncf_extension_folder_follows_dfq_cache(tmp_path, monkeypatch):
    from dfq_nncf.toolchain import configure_extension_build

    monkeypatch.setenv("DFQ_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    configure_extension_build()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "elsewhere" / "torch_extensions")
