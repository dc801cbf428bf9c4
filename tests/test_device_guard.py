"""Tensors on the wrong device, caught without a GPU.

``FakeDevice`` (tests/device_guard.py) stands in a second device whose tensors hold CPU values,
and fails any op that mixes them with a CPU tensor. Every source synthesizes end to end on it.
FX and PT2E calibrate, correct biases, convert and run there; every distiller trains there (NNCF's
own tensor backend knows only 'cpu' and 'cuda', so NNCF is left to the ``cuda`` tests). The ``cuda`` tests run the same pipelines on a real GPU."""
from __future__ import annotations

import pytest
import torch

import dfq_plugins as dfq
from dfq_plugins import QuantScheme
from dfq_plugins.api import make_toolchain
from dfq_plugins.quant.learnable import learned_range_parameters
from dfq_plugins.synthesizers.bn_stats import BNStatsLoss, LayerStats
from tests.conftest import TINY_SPEC, make_trained_tiny
from tests.device_guard import DeviceMismatch, FakeDevice

SOURCES = [("zeroq", {"iterations": 2}), ("intraq", {"iterations": 2}), ("hast", {"iterations": 2}),
           ("genie", {"iterations": 2}), ("dynadfq", {"iterations": 2}),
           ("diffdfq", {"base": {"name": "zeroq", "iterations": 2}}), ("noise", {}), ("real", {})]
DISTILLERS = [("torch-ao-fx", "kd"), ("torch-ao-fx", "gdfq"), ("torch-ao-fx", "adadfq"), ("torch-ao-fx", "causal"),
              ("torch-ao-fx", "diffdfq"), ("torch-ao-fx", "reconstruct"), ("torchao-pt2e", "reconstruct"),
              ("torchao-pt2e", "kd"), ("torchao-pt2e", "adadfq"), ("torch-ao-fx", "reconstruct+kd")]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_the_guard_fails_an_op_that_mixes_devices_and_lets_moves_through():
    with FakeDevice() as guard:
        x = torch.randn(4, 3).to(guard.device)
        assert x.device == guard.device and (x * 2).device == guard.device
        assert torch.zeros(3, device=x.device).device == guard.device  # made on the device: fine
        assert torch.tensor([1.0, 2.0], device=x.device).device == guard.device
        assert (x * torch.tensor(2.0)).device == guard.device  # a 0-dim CPU scalar is allowed, as on CUDA
        assert x.cpu().device.type == "cpu" and float(x.sum()) == pytest.approx(float(x.cpu().sum()))
        with pytest.raises(DeviceMismatch, match="made without a device or left on the CPU"):
            x * torch.ones(3)  # made without a device


def test_the_guard_catches_the_bn_loss_weights_made_on_the_cpu(monkeypatch):
    """The first GPU bug: BNStatsLoss built its per-layer weights with torch.ones(n) on the CPU."""
    def on_cpu(self, n, device=None):
        return torch.ones(n) / n

    with FakeDevice() as guard:
        stats = [LayerStats(torch.randn(8).to(guard.device), torch.rand(8).to(guard.device)) for _ in range(3)]
        targets = [LayerStats(torch.zeros(8, device=guard.device), torch.ones(8, device=guard.device))] * 3
        assert BNStatsLoss()(stats, targets).device == guard.device
        monkeypatch.setattr(BNStatsLoss, "layer_weights", on_cpu)
        with pytest.raises(DeviceMismatch):
            BNStatsLoss()(stats, targets)


@pytest.fixture(scope="module")
def pool():
    return torch.randn(16, *TINY_SPEC.shape), torch.randint(0, 4, (16,))


@pytest.mark.parametrize("name, options", SOURCES, ids=[s for s, _ in SOURCES])
def test_every_source_synthesizes_on_a_second_device(name, options, pool):
    model = make_trained_tiny()
    with FakeDevice() as guard:
        cs = dfq.synthesize(model, {"name": name, **options}, input_spec=TINY_SPEC, num_samples=8, batch_size=4,
                            progress=False, cache=False, device=str(guard.device),
                            data=pool if name == "real" else None)
        ran_there = guard.ops_on_device
    assert cs.images.device.type == "cpu" and torch.isfinite(cs.images).all()  # sets are stored on the CPU
    assert ran_there > (50 if options else 0)  # the work really ran on the device
    assert next(model.parameters()).device.type == "cpu"  # the user's model is given back where it was


@pytest.mark.parametrize("name", ["torch-ao-fx", "torchao-pt2e"])
def test_learned_ranges_follow_the_students_device(name):
    """The second GPU bug: reconstruct's learnable fake-quants were built on the CPU, so the block inputs
    followed them there while the weights stayed on the GPU."""
    chain = make_toolchain(name)
    calib = dfq.synthesize(make_trained_tiny(), "noise", input_spec=TINY_SPEC, num_samples=16, batch_size=8,
                           progress=False, cache=False)
    student = chain.quantize(make_trained_tiny(), QuantScheme.parse("w4a4"), calib, trainable=True)
    quantizers = [m for m in student.modules() if hasattr(m, "fake_quant_enabled")]
    with FakeDevice() as guard:
        for m in quantizers:  # (a torch.export GraphModule's own weights cannot be swapped to the stand-in)
            m.to(guard.device)
        chain.make_ranges_learnable(student)
    params = learned_range_parameters(student)
    assert params and {p.device for p in params} == {guard.device}
    assert {t.device for m in student.modules() if hasattr(m, "fake_quant_enabled")
            for t in (*m.parameters(), *m.buffers())} == {guard.device}


def _on_device(guard: FakeDevice, **kwargs):
    model = make_trained_tiny()
    calib = dfq.synthesize(model, kwargs.pop("source", "noise"), input_spec=TINY_SPEC, num_samples=16, batch_size=8,
                           progress=False, cache=False)
    q = dfq.quantize(model, source=calib, input_spec=TINY_SPEC, device=str(guard.device), progress=False,
                     cache=False, **kwargs)
    with torch.no_grad():
        return q(torch.randn(4, *TINY_SPEC.shape).to(guard.device))


@pytest.mark.parametrize("toolchain", ["torch-ao-fx", "torchao-pt2e"])
@pytest.mark.parametrize("scheme", ["w8a8", "w4a4", "w4a4-wmse-ahist-bcbn-protoB"])
def test_calibration_bias_correction_and_convert_run_on_a_second_device(toolchain, scheme):
    if toolchain == "torch-ao-fx" and scheme == "w8a8":
        pytest.skip("FX's int8 model runs on fbgemm kernels, which are CPU-only")
    with FakeDevice() as guard:
        out = _on_device(guard, toolchain=toolchain, scheme=scheme)
        ran_there = guard.ops_on_device
    assert out.device == guard.device and torch.isfinite(out.cpu()).all() and ran_there > 100


@pytest.mark.parametrize("toolchain, distill", DISTILLERS, ids=[f"{t}-{d}" for t, d in DISTILLERS])
def test_every_distiller_trains_on_a_second_device(toolchain, distill):
    stages = [{"name": d, **({"warmup_steps": 0} if d in ("gdfq", "adadfq", "causal") else {}),
               # noise images: bn_check would refuse them before any block trains; a high bar runs the check
               # on the device and the blocks too
               **({"steps": 3, "bn_check": 100.0} if d == "reconstruct" else {})} for d in distill.split("+")]
    with FakeDevice() as guard:
        out = _on_device(guard, toolchain=toolchain, scheme="w4a4", distill=stages, steps=3,
                         source={"name": "diffdfq", "base": "noise", "qaware_weight": 0} if distill == "diffdfq" else "noise")
        ran_there = guard.ops_on_device
    assert out.device == guard.device and torch.isfinite(out.cpu()).all() and ran_there > 1000


def _speed_rows(device: str) -> list[dict]:
    from dfq_plugins.api import make_distiller
    from dfq_plugins.bench.distill_speed import measure_distiller_speed
    from dfq_plugins.teacher import Teacher

    chain = make_toolchain("torch-ao-fx")
    calib = dfq.synthesize(make_trained_tiny(), "noise", input_spec=TINY_SPEC, num_samples=16, batch_size=8, progress=False,
                           cache=False)
    rows = []
    for name in ("kd", "gdfq"):
        model = make_trained_tiny()
        student = dfq.quantize(model, source=calib, input_spec=TINY_SPEC, scheme="w4a4", trainable=True,
                               device=device, progress=False, cache=False)
        d = make_distiller({"name": name, "batch_size": 8, **({"warmup_steps": 1} if name == "gdfq" else {})})
        rows.append(measure_distiller_speed(Teacher(model.to(device), TINY_SPEC), d, student, chain, calib,
                                            steps=2, repeats=1))
    return rows


def test_speed_times_synthesis_and_distiller_steps_on_a_second_device():
    """`dfq speed [--distill] --device`: the floors' images and the timed work stay on the device."""
    from dfq_plugins.api import make_synthesizer
    from dfq_plugins.bench.speed import measure_speed
    from dfq_plugins.teacher import Teacher

    with FakeDevice() as guard:
        rows = _speed_rows(str(guard.device))
        synthesis = measure_speed(Teacher(make_trained_tiny().to(guard.device), TINY_SPEC), make_synthesizer("zeroq"),
                                  batch=4, iterations=2, repeats=1)
        ran_there = guard.ops_on_device
    assert [r["device"] for r in rows] == [str(guard.device)] * 2 and ran_there > 1000
    assert synthesis["images_x_iterations_per_s"] > 0


@cuda
@pytest.mark.cuda
def test_distiller_speed_on_cuda():
    rows = _speed_rows("cuda")
    assert all(r["device"].startswith("cuda") and r["ratio_to_floor"] > 0 for r in rows)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("name, options", SOURCES, ids=[s for s, _ in SOURCES])
def test_every_source_on_cuda(name, options, pool):
    options = {k: v for k, v in options.items() if k != "qaware_weight"}
    cs = dfq.synthesize(make_trained_tiny(), {"name": name, **options}, input_spec=TINY_SPEC, num_samples=8,
                        batch_size=4, progress=False, cache=False, device="cuda",
                        data=pool if name == "real" else None)
    assert torch.isfinite(cs.images).all()


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("toolchain", ["torch-ao-fx", "torchao-pt2e", "nncf"])
@pytest.mark.parametrize("distill", [None, "kd", "gdfq", "adadfq", "causal", "diffdfq", "reconstruct"])
def test_quantize_and_distill_on_cuda(toolchain, distill):
    if distill == "reconstruct" and toolchain == "nncf":
        pytest.skip("reconstruct needs a graph student")
    model = make_trained_tiny()
    source = "diffdfq" if distill == "diffdfq" else "zeroq"
    q = dfq.quantize(model, toolchain=toolchain, scheme="w4a8" if toolchain == "nncf" else "w4a4", source=source,
                     input_spec=TINY_SPEC, num_samples=16, batch_size=8, device="cuda",
                     **({"distill": distill, "steps": 3} if distill else {}))
    x = torch.randn(8, *TINY_SPEC.shape, device="cuda")
    with torch.no_grad():
        assert torch.isfinite(q(x)).all()
