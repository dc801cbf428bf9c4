"""Fault matrix, interrupts: Ctrl-C or SIGTERM at any phase of a distillation step checkpoints
completed steps only, so the resumed run ends bitwise where an uninterrupted one ends."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors import safe_open

from dfq_plugins.api import make_distiller
from dfq_plugins.distillers.loop import TrainingRun
from dfq_plugins.teacher import Teacher

from ..conftest import TINY_SPEC, make_trained_tiny
from ..test_distillers import calibration_set, student_for

CONFIG = {"name": "kd", "lr": 0.01, "checkpoint_every": 0}
STEPS, AT = 8, 5


def run_kd(workdir, patch=None):
    chain, student = student_for(make_trained_tiny())
    kd = make_distiller(CONFIG, steps=STEPS)
    if patch is not None:
        patch(kd, student)
    kd.distill(Teacher(make_trained_tiny(), TINY_SPEC), student, calibration_set(), toolchain=chain,
               progress=False, workdir=workdir, key="k")
    return student, kd


def signal_once(sig):
    sent = []

    def send():
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), sig)
    return send


def phase_patch(phase, sig):
    """Send ``sig`` once, during step AT, at the given point of the step."""
    send = signal_once(sig)

    def patch(kd, student):
        original_step = kd.train_step
        state = {"step": -1}

        def train_step(run, step):
            state["step"] = step
            if step == AT and phase == "start":
                send()
            out = original_step(run, step)
            if step == AT and phase == "end":
                send()
            return out

        kd.train_step = train_step
        if phase == "after-forward":
            student.register_forward_hook(lambda *_: send() if state["step"] == AT else None)
        if phase == "after-optimizer-step":
            original_update = TrainingRun.update

            def update(self, name, loss):
                original_update(self, name, loss)
                if state["step"] == AT:
                    send()
            TrainingRun.update = update
    return patch


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    student, _ = run_kd(tmp_path_factory.mktemp("whole"))
    return student.state_dict()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
@pytest.mark.parametrize("phase", ["start", "after-forward", "after-optimizer-step", "end"])
def test_an_interrupt_at_any_phase_resumes_bitwise(reference, tmp_path, monkeypatch, phase, sig):
    monkeypatch.setattr(TrainingRun, "update", TrainingRun.update)  # the patch below replaces it; undo restores
    with pytest.raises(KeyboardInterrupt):
        run_kd(tmp_path, phase_patch(phase, sig))
    with safe_open(str(tmp_path / "checkpoint.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["dfq_checkpoint"])["step"] == AT + 1  # the step it landed in, completed
    monkeypatch.undo()
    resumed, kd = run_kd(tmp_path)
    assert kd.last_run.step == STEPS
    for name, value in reference.items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_a_second_interrupt_stops_at_once_without_a_half_step_checkpoint(reference, tmp_path):
    """Two Ctrl-C in one step: out now; no checkpoint of that step (none periodic either here), so
    the rerun starts over and still ends where the uninterrupted run ends."""
    def patch(kd, student):
        original_step = kd.train_step

        def train_step(run, step):
            if step == AT:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            return original_step(run, step)
        kd.train_step = train_step

    with pytest.raises(KeyboardInterrupt):
        run_kd(tmp_path, patch)
    assert not (tmp_path / "checkpoint.safetensors").exists()
    resumed, _ = run_kd(tmp_path)
    for name, value in reference.items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_the_signal_handlers_are_restored():
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    run_kd(None)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_sigterm_during_synthesis_keeps_finished_batches_and_says_so(tmp_path):
    """The defect: SIGTERM in synthesis ended with rc -15 and no message (distillation handled it)."""
    import subprocess
    import sys
    import time

    from ..test_own_model_cli import NET, SPEC
    from ..test_as_users_run import dfq_command

    (tmp_path / "net.py").write_text(NET)
    env = {**os.environ, "DFQ_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([*dfq_command(), "synthesize", "--model", f"{tmp_path / 'net.py'}:build", *SPEC,
                             "--images", "64", "--batch-size", "8", "--set", "zeroq.iterations=400",
                             "--set", "zeroq.synthesis_batch_size=8"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "cache" / "calibration"
    deadline = time.monotonic() + 120
    while not list(partial.glob("*.partial/batch-*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.2)  # wait until one batch is finished
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: finished batches" in err and "Traceback" not in err
    assert list(partial.glob("*.partial/batch-*.safetensors"))  # kept for the rerun
