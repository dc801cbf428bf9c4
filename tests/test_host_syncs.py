"""A GPU never waits for the host in the steady state of a distillation step, checked without a GPU.

On a GPU, reading a value on the host (``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()``) waits
for every queued kernel. ``FakeDevice`` records each such read on its stand-in device with the
line that asked (tests/device_guard.py). Before the loop read its losses every ``LOG_EVERY`` steps
and the fake-quant switches moved to the host, a kd step on the tiny net made 31 of them; the
toolchain's own weight-observer check (one per weight quantizer) is what remains.
"""
from __future__ import annotations

import collections
import json

import pytest
import torch
from safetensors import safe_open

import dfq_plugins as dfq
from dfq_plugins.distillers.loop import LOG_EVERY, LossMeter
from dfq_plugins.errors import NonFiniteError
from dfq_plugins.quant.hostflags import HOST_FLAGS, with_host_flags
from tests.conftest import TINY_SPEC, make_trained_tiny
from tests.device_guard import FakeDevice, OnDevice


def _kd_syncs(toolchain: str, steps: int, **kd) -> tuple[collections.Counter, int]:
    """Host reads during a kd run on the stand-in device, by call site, and the weight quantizers."""
    model = make_trained_tiny()
    calib = dfq.synthesize(model, "noise", input_spec=TINY_SPEC, num_samples=16, batch_size=8, progress=False,
                           cache=False)
    with FakeDevice() as guard:
        q = dfq.quantize(model, source=calib, input_spec=TINY_SPEC, device=str(guard.device), progress=False,
                         cache=False, toolchain=toolchain, scheme="w4a4", steps=steps,
                         distill=[{"name": "kd", "checkpoint_every": 0, "observer_steps": 2, "warmup_steps": 0, **kd}])
    assert q is not None
    weight_quantizers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    return collections.Counter(guard.host_syncs), weight_quantizers


@pytest.mark.parametrize("toolchain", ["torch-ao-fx", "torchao-pt2e"])
def test_a_kd_step_reads_the_device_only_every_few_steps(toolchain):
    short, n_weights = _kd_syncs(toolchain, 5)
    long, _ = _kd_syncs(toolchain, 5 + 2 * LOG_EVERY)
    # totals, not sites: FX names its generated graph code afresh in every run
    per_step = (sum(long.values()) - sum(short.values())) / (2 * LOG_EVERY)
    ours = {site: long[site] - short[site] for site in long
            if site.startswith(("distillers/", "quant/", "dfq_plugins/"))}
    # our loop: the losses and the non-finite flags, one read each per LOG_EVERY steps
    assert 0 < sum(ours.values()) <= 2 * 2, ours
    # the rest is the toolchain's weight observer checking its min <= max, once per weight quantizer
    assert per_step <= n_weights + 0.5, long.most_common(5)


def test_the_switches_stay_on_the_host_and_the_state_dict_is_the_toolchains():
    from torch.ao.quantization.fake_quantize import FakeQuantize
    from torch.ao.quantization.observer import MinMaxObserver

    plain = FakeQuantize(observer=MinMaxObserver)
    ours = with_host_flags(FakeQuantize)(observer=MinMaxObserver)
    assert isinstance(ours, FakeQuantize) and type(ours).__name__ == "FakeQuantize"
    ours(torch.randn(4, 3))
    ours.disable_observer()
    state = ours.state_dict()
    assert list(plain.state_dict()) != [] and set(state) == set(plain.state_dict())
    assert int(state["observer_enabled"]) == 0 and not any(n in dict(ours.named_buffers()) for n in HOST_FLAGS)
    plain.load_state_dict(state)  # a toolchain's own quantizer reads ours, and ours reads it back
    again = with_host_flags(FakeQuantize)(observer=MinMaxObserver)
    again.load_state_dict(plain.state_dict())
    assert int(again.observer_enabled) == 0 and torch.equal(again.scale, ours.scale)
    with FakeDevice() as guard:
        again.to(guard.device)
        assert isinstance(again.scale, OnDevice) and not isinstance(again.observer_enabled, OnDevice)
        again(torch.randn(4, 3).to(guard.device))
        assert guard.host_syncs == [], guard.host_syncs


def test_a_nan_loss_on_a_device_stops_at_the_next_read_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from dfq_plugins.distillers.kd import KDDistiller

    original = KDDistiller.student_loss

    def nan_from_step_3(self, z_q, z_p, y):
        loss, parts = original(self, z_q, z_p, y)
        return (loss * float("nan") if self._step >= 3 else loss), parts

    train_step = KDDistiller.train_step

    def counting(self, run, step):
        self._step = step
        return train_step(self, run, step)

    monkeypatch.setattr(KDDistiller, "student_loss", nan_from_step_3)
    monkeypatch.setattr(KDDistiller, "train_step", counting)
    monkeypatch.setenv("DFQ_CACHE", str(tmp_path))
    model = make_trained_tiny()
    calib = dfq.synthesize(model, "noise", input_spec=TINY_SPEC, num_samples=16, batch_size=8, progress=False,
                           cache=False)
    with FakeDevice() as guard, pytest.raises(NonFiniteError, match="student loss became NaN or infinite at step 3"):
        dfq.quantize(model, source=calib, input_spec=TINY_SPEC, device=str(guard.device), progress=False,
                     toolchain="torch-ao-fx", scheme="w4a4", steps=20,
                     distill=[{"name": "kd", "checkpoint_every": 2}])
    (ckpt,) = (tmp_path / "distill").glob("*/checkpoint.safetensors")
    with safe_open(str(ckpt), framework="pt") as f:
        assert json.loads(f.metadata()["dfq_checkpoint"])["step"] == 2  # the last one before the NaN


def test_the_loss_meter_keeps_the_history_a_float_per_step_gave():
    values = [torch.tensor(v, dtype=torch.float32) for v in (0.3, 1.7, 2.25, 0.01, 9.5)]
    meter, running = LossMeter(), None
    for v in values:
        meter.add({"kd": v, "level": 2.0})
        x = v.item()
        running = x if running is None else 0.9 * running + 0.1 * x
    assert meter.read() == {"kd": running, "level": 2.0}
