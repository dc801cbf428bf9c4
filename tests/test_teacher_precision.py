"""`teacher_precision = "bf16"`: the teacher's forward under bfloat16 autocast, a GPU speed knob (issue 23).

Off by default, so every CPU result and cache key stays what it was; on, the set and the student change,
and the key with them. CPU autocast runs the same code path as CUDA's, so these tests run here.
"""
from __future__ import annotations

import pytest
import torch

from dfq_plugins.api import make_distiller, make_synthesizer, make_toolchain
from dfq_plugins.bench.distill_speed import measure_distiller_speed
from dfq_plugins.bench.report import distill_speed_table, speed_table
from dfq_plugins.bench.speed import measure_speed
from dfq_plugins.synthesizers.bn_stats import BNStatsRecorder
from dfq_plugins.teacher import Teacher

from .conftest import TINY_SPEC, make_trained_tiny
from .test_distillers import calibration_set, student_for


def test_a_bf16_teacher_returns_float32_logits_and_statistics_and_restores_itself():
    teacher = Teacher(make_trained_tiny(), TINY_SPEC)
    x = torch.randn(8, *TINY_SPEC.shape)
    exact = teacher(x)
    recorder = BNStatsRecorder([m for _, m in teacher.bn_layers()])
    with pytest.raises(RuntimeError, match="boom"), teacher.precision("bf16"), recorder.record():
        low = teacher(x)
        assert low.dtype == torch.float32 and all(s.mean.dtype == torch.float32 for s in recorder.stats)
        assert not torch.equal(low, exact) and torch.allclose(low, exact, atol=0.1, rtol=0.05)
        raise RuntimeError("boom")
    assert torch.equal(teacher(x), exact)  # back to float32 after the error
    with pytest.raises(ValueError, match="choose one of"), teacher.precision("fp16"):
        pass


def test_bf16_synthesis_makes_its_own_set_under_its_own_key():
    teacher = Teacher(make_trained_tiny(), TINY_SPEC)
    default = make_synthesizer({"name": "zeroq", "iterations": 3, "synthesis_batch_size": 8})
    low = make_synthesizer({"name": "zeroq", "iterations": 3, "synthesis_batch_size": 8, "teacher_precision": "bf16"})
    assert "teacher_precision" not in default.config_dict()  # the caches made before it stay valid
    assert low.config_dict()["teacher_precision"] == "bf16"
    a = default.synthesize(teacher, 8, seed=0, progress=False).images
    b = low.synthesize(teacher, 8, seed=0, progress=False).images
    assert torch.isfinite(b).all() and b.shape == a.shape and not torch.equal(a, b)
    assert teacher._precision == "fp32"

    row = {"model": "tiny", **measure_speed(teacher, low, batch=8, iterations=2, repeats=1)}
    assert row["teacher_precision"] == "bf16" and "zeroq (teacher bf16)" in speed_table([row])
    with pytest.raises(ValueError, match="teacher_precision='half'"):
        make_synthesizer({"name": "zeroq", "teacher_precision": "half"})


def test_a_distiller_trains_against_a_bf16_teacher_and_says_so_in_its_speed_row():
    cs = calibration_set()
    chain, student = student_for(make_trained_tiny())
    before = {k: v.clone() for k, v in student.state_dict().items()}
    kd = make_distiller({"name": "kd", "lr": 0.01, "checkpoint_every": 0, "batch_size": 8,
                         "teacher_precision": "bf16"}, steps=3)
    assert "teacher_precision" not in make_distiller("kd").config_dict()
    assert kd.config_dict()["teacher_precision"] == "bf16"
    teacher = Teacher(make_trained_tiny(), TINY_SPEC)
    seen, step = [], kd.train_step

    def spy(run, i):
        seen.append(run.teacher._precision)
        return step(run, i)

    kd.train_step = spy
    kd.distill(teacher, student, cs, toolchain=chain, progress=False)
    assert seen == ["bf16"] * 3 and kd.last_run.step == 3 and teacher._precision == "fp32"
    changed = [k for k, v in student.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed, "the student did not train"

    row = measure_distiller_speed(teacher, kd, student_for(make_trained_tiny())[1], make_toolchain("torch-ao-fx"),
                                  cs, steps=1, repeats=1)
    row.update(model="tiny", toolchain="torch-ao-fx", scheme="w4a4")
    assert row["teacher_precision"] == "bf16" and "kd (teacher bf16)" in distill_speed_table([row])


def test_reconstruct_refuses_a_teacher_precision_it_would_ignore():
    with pytest.raises(ValueError, match="does not apply"):
        make_distiller({"name": "reconstruct", "teacher_precision": "bf16"})
    with pytest.raises(ValueError, match="choose one of"):
        make_distiller({"name": "kd", "teacher_precision": "fp16"})
