"""Device plumbing, tested on the CPU: names are checked before any work, random draws stay on
the CPU, and the pieces of the hot loops follow their input's device (``meta`` stands in for a
second device: mixing it with a CPU tensor in an element-wise op raises, as CUDA would)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dfq_plugins as dfq
from dfq_plugins.cli import main
from dfq_plugins.device import module_device, resolve_device, to_device
from dfq_plugins.distillers.batches import sample_batch, shift_flip
from dfq_plugins.errors import DeviceError
from dfq_plugins.synthesizers.augment import SynthesisAugment
from dfq_plugins.synthesizers.genie import GenieSynthesizer
from dfq_plugins.synthesizers.labels import target_probability_targets
from dfq_plugins.synthesizers.zeroq import ZeroQSynthesizer
from dfq_plugins.teacher import Teacher
from tests.conftest import TINY_SPEC

META = torch.device("meta")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")


def test_auto_is_where_the_model_is(tiny):
    tiny, _ = tiny
    assert resolve_device(None, tiny) == torch.device("cpu")
    assert resolve_device("auto", tiny) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@no_cuda
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(DeviceError, match="asked for CUDA, but"):
        resolve_device("cuda")


@pytest.mark.parametrize("bad, message", [("gpu", "not a device name"), (3, "must be a string"),
                                          ("meta", "holds no values")])
def test_bad_device_names_are_clear_errors(bad, message):
    with pytest.raises(DeviceError, match=message):
        resolve_device(bad)


def test_a_model_spread_over_two_devices_is_refused():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).to(META))
    with pytest.raises(DeviceError, match="several devices"):
        resolve_device(None, model)


def test_explicit_cpu_is_bitwise_the_default(tiny):
    tiny, _ = tiny
    kw = {"input_spec": TINY_SPEC, "num_samples": 8, "batch_size": 4, "progress": False, "cache": False}
    source = {"name": "zeroq", "iterations": 3}
    default = dfq.synthesize(tiny, source, **kw)
    explicit = dfq.synthesize(tiny, source, device="cpu", **kw)
    assert default.content_hash() == explicit.content_hash()
    assert explicit.manifest["device"] == "cpu"


def test_quantize_and_distill_take_a_device(tiny):
    tiny, _ = tiny
    cs = dfq.synthesize(tiny, "noise", input_spec=TINY_SPEC, num_samples=8, batch_size=4, progress=False)
    student = dfq.quantize(tiny, source=cs, input_spec=TINY_SPEC, trainable=True, device="cpu")
    out = dfq.distill(tiny, student, cs, distiller={"name": "kd", "steps": 2}, input_spec=TINY_SPEC,
                      device="cpu", progress=False, cache=False)
    assert module_device(out) == torch.device("cpu")
    with pytest.raises(DeviceError):
        dfq.quantize(tiny, source=cs, input_spec=TINY_SPEC, device="nowhere")


# -- the hot loops' pieces follow the input's device ----------------------------------------------
def test_synthesis_pieces_stay_on_the_teachers_device(tiny):
    tiny, _ = tiny
    teacher = Teacher(tiny.to(META), TINY_SPEC)
    assert teacher.device == META
    g = torch.Generator().manual_seed(0)
    canvas = ZeroQSynthesizer(iterations=1, scheduler="none").make_canvas(teacher, 4, g)
    assert canvas.render().device == META
    view = SynthesisAugment(smoothing=True, flip=True, jitter=2, crop_scale=0.5)(canvas.render(), g)
    assert view.device == META
    loss = teacher(view).logsumexp(1).mean()
    loss.backward()
    canvas.step(loss)  # Adam, then the clamp to valid pixels, with the spec's bounds on the device
    assert TINY_SPEC.clip(view).device == META
    genie = GenieSynthesizer(iterations=1).make_canvas(teacher, 4, g)
    assert genie.render().device == META
    targets = target_probability_targets(4, 4, g, 0.5, 1.0).to(META)
    assert {t.device for t in (targets.labels, targets.soft, targets.target_prob, targets.hard_mask)} == {META}


def test_distillation_batches_are_drawn_on_the_cpu_and_moved():
    images, labels = torch.randn(10, 3, 8, 8), torch.arange(10)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    x_cpu, (_,) = sample_batch(images, 6, g1, "shift_flip", (labels,))
    x_meta, (y_meta,) = sample_batch(images, 6, g2, "shift_flip", (labels,), device=META)
    assert x_meta.device == y_meta.device == META and x_meta.shape == x_cpu.shape
    assert g1.get_state().equal(g2.get_state())  # the same draws, whatever the device
    assert shift_flip(torch.randn(2, 3, 8, 8, device=META), torch.Generator()).device == META


def test_to_device_moves_every_batch_form():
    batch = {"a": torch.zeros(1), "b": (torch.zeros(1), [torch.zeros(1)])}
    moved = to_device(batch, META)
    assert moved["a"].device == moved["b"][0].device == moved["b"][1][0].device == META


def test_the_cli_refuses_an_absent_device_before_any_work(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["quantize", "--device", "cuda", "--source", "noise", "--quiet"]) == 2
    err = capsys.readouterr()
    assert "asked for CUDA" in err.err and "calibration data" not in err.out
    with pytest.raises(SystemExit):  # a command that does not take one says so (argparse)
        main(["dynamic", "--device", "cpu"])
    assert "unrecognized arguments: --device" in capsys.readouterr().err
