"""The three toolchains on real small models: schemes honoured, errors clear, models usable."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import dfq_plugins
from dfq_plugins import CalibrationSet, QuantScheme
from dfq_plugins.api import make_toolchain
from dfq_plugins.errors import UnsupportedSchemeError, UntraceableModelError

from .conftest import TINY_SPEC, make_tiny

TOOLCHAINS = ["torch-ao-fx", "torchao-pt2e", "nncf"]


def calib(n=32):
    return CalibrationSet(torch.randn(n, *TINY_SPEC.shape), batch_size=8)


def agreement(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x).argmax(1) == b(x).argmax(1)).float().mean())


@pytest.mark.compat
@pytest.mark.parametrize("name", TOOLCHAINS)
def test_w8a8_follows_the_float_model_and_leaves_it_untouched(name):
    model = make_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = make_toolchain(name).quantize(model, QuantScheme.parse("w8a8"), calib())
    x = torch.randn(64, *TINY_SPEC.shape)
    assert agreement(model, q, x) >= 0.9
    with torch.no_grad():
        assert not torch.equal(model(x), q(x))  # something was quantized (torch 2.11's PT2E once annotated nothing)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert q(torch.randn(1, *TINY_SPEC.shape)).shape == (1, 4)  # batch 1 works (dynamic batch)
    assert q(torch.randn(7, *TINY_SPEC.shape)).shape == (7, 4)


@pytest.mark.compat
def test_fx_4_bits_really_have_16_levels():
    """Weights and activations of the converted FX model stay on a 16-level grid, clamped."""
    model = make_tiny()
    q = make_toolchain("torch-ao-fx").quantize(model, QuantScheme.parse("w4a4"), calib())
    x = torch.randn(16, *TINY_SPEC.shape)
    acts = []
    handle = q.get_submodule("conv2").register_forward_pre_hook(lambda m, a: acts.append(a[0]))
    try:
        q(x * 3)  # far outside the calibrated range: must clamp, not extend the grid
    finally:
        handle.remove()
    assert len(torch.unique(acts[0])) <= 16
    conv = q.get_submodule("conv1")
    ints = torch.round(conv.get_weight() / conv.weight_scale.view(-1, 1, 1, 1))
    assert ints.min() >= -8 and ints.max() <= 7


def test_pt2e_scheme_reaches_the_observers():
    tc = make_toolchain("torchao-pt2e")
    prepared = tc.prepare(make_tiny(), QuantScheme.parse("w4a4"), (torch.randn(2, *TINY_SPEC.shape),))
    ranges = {(m.quant_min, m.quant_max) for m in prepared.modules() if hasattr(m, "quant_min")}
    assert (0, 15) in ranges and (-8, 7) in ranges


def test_pt2e_reduce_range_halves_the_activation_grid_and_still_lowers_to_int8():
    """For CPUs without VNNI: u8 activations on 0..127, weights untouched; the int8 program still runs."""
    tc = make_toolchain({"name": "torchao-pt2e", "reduce_range": True})
    x = torch.randn(2, *TINY_SPEC.shape)
    prepared = tc.prepare(make_tiny(), QuantScheme.parse("w8a8"), (x,))
    ranges = {(m.quant_min, m.quant_max) for m in prepared.modules() if hasattr(m, "quant_min")}
    assert (0, 127) in ranges and (0, 255) not in ranges and (-128, 127) in ranges
    with pytest.raises(ValueError, match="reduce_range"):
        make_toolchain({"name": "torchao-pt2e", "reduce_range": "maybe"})


def test_nncf_overflow_fix_reaches_nncf_and_bad_values_are_refused(monkeypatch):
    import nncf

    seen = {}
    real = nncf.quantize

    def spy(model, dataset, **kwargs):
        seen["overflow_fix"] = kwargs["advanced_parameters"].overflow_fix
        return real(model, dataset, **kwargs)

    monkeypatch.setattr(nncf, "quantize", spy)
    make_toolchain({"name": "nncf", "overflow_fix": "enable"}).quantize(make_tiny(), QuantScheme.parse("w8a8"), calib())
    assert seen["overflow_fix"].value == "enable"
    with pytest.raises(ValueError, match="overflow_fix"):
        make_toolchain({"name": "nncf", "overflow_fix": "on"})


@pytest.mark.compat
def test_nncf_bits_reach_its_quantizers():
    q = make_toolchain("nncf").quantize(make_tiny(), QuantScheme.parse("w4a8"), calib())
    bits = {int(m.num_bits) for m in q.modules() if hasattr(m, "num_bits")}
    assert bits == {4, 8}


def test_nncf_reaches_4_bit_activations_with_pooling_left_out():
    """NNCF's NPU config only quantizes pooling inputs at 8 bits; we keep pooling out of the scope."""
    q = make_toolchain("nncf").quantize(make_tiny(), QuantScheme.parse("w4a4-symact"), calib())
    bits = {int(m.num_bits) for m in q.modules() if hasattr(m, "num_bits")}
    assert bits == {4}


def test_trainable_students_have_gradients():
    for name in TOOLCHAINS:
        student = make_toolchain(name).quantize(make_tiny(), QuantScheme.parse("w8a8"), calib(), trainable=True)
        out = student(torch.randn(4, *TINY_SPEC.shape))
        out.sum().backward()
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name


def test_nncf_takes_sequential_models():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4)).eval()
    q = make_toolchain("nncf").quantize(model, QuantScheme.parse("w8a8"), calib())
    assert q(torch.randn(2, *TINY_SPEC.shape)).shape == (2, 4)


def test_schemes_a_toolchain_cannot_express_are_clear_errors():
    nncf = make_toolchain("nncf")
    with pytest.raises(UnsupportedSchemeError, match="first/last layer"):
        nncf.check_scheme(QuantScheme.parse({"name": "w4a8", "first_layer": {"weight_bits": 8, "act_bits": 8}}))
    with pytest.raises(UnsupportedSchemeError, match="symmetric activations"):
        nncf.check_scheme(QuantScheme.parse("w4a4"))
    with pytest.raises(UnsupportedSchemeError):  # before any synthesis is spent
        dfq_plugins.quantize(make_tiny(), toolchain="nncf", scheme="w4a4", input_spec=TINY_SPEC, source="zeroq")


def test_a_data_dependent_branch_is_explained_and_nncf_takes_shared_layers():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_tiny()

        def forward(self, x):
            if x.sum() > 0:
                return self.net(x)
            return self.net(-x)

    with pytest.raises(UntraceableModelError, match="branches on tensor values"):
        make_toolchain("torch-ao-fx").quantize(Branchy(), QuantScheme.parse("w8a8"), calib())
    with warnings.catch_warnings():  # both branches run the same layers: NNCF quantizes them all, no warning
        warnings.simplefilter("error", UserWarning)
        q = make_toolchain("nncf").quantize(Branchy(), QuantScheme.parse("w8a8"), calib())
    assert q(torch.randn(2, *TINY_SPEC.shape)).shape == (2, 4)


def test_first_layer_override_in_fx():
    scheme = QuantScheme.parse({"name": "w4a4", "first_layer": {"weight_bits": 8, "act_bits": 8}})
    prepared = make_toolchain("torch-ao-fx").prepare(make_tiny(), scheme, (torch.randn(2, *TINY_SPEC.shape),))
    ranges = {name: (m.quant_min, m.quant_max) for name, m in prepared.named_modules() if hasattr(m, "quant_min")}
    assert (0, 255) in ranges.values() and (0, 15) in ranges.values()


def test_nncf_dropin_switches_a_script_to_data_free():
    import dfq_nncf

    model = make_tiny()
    q = dfq_nncf.quantize(model, source="noise", input_spec=TINY_SPEC, num_samples=32, batch_size=8)
    assert agreement(model, q, torch.randn(32, *TINY_SPEC.shape)) >= 0.8
    with pytest.raises(ValueError, match="input_spec"):
        dfq_nncf.quantize(model, source="noise")
    ds = dfq_nncf.calibration_dataset(model, "noise", input_spec=TINY_SPEC, num_samples=16, batch_size=8)
    assert ds.get_length() == 2


def test_pt2e_warns_when_its_quantizer_skips_layers():
    class PaddedConv(nn.Conv2d):  # a Conv2d subclass: X86InductorQuantizer's patterns miss it
        def forward(self, x):
            return super().forward(nn.functional.pad(x, (0, 1, 0, 1)))

    model = make_tiny()
    model.conv1 = PaddedConv(3, 8, 3, padding=1, bias=False)
    with pytest.warns(UserWarning, match="left 1 of 3 conv/linear layers unquantized"):
        make_toolchain("torchao-pt2e").prepare(model, QuantScheme.parse("w8a8"), (torch.randn(2, *TINY_SPEC.shape),))


@pytest.mark.parametrize("name", ["torch-ao-fx", "torchao-pt2e"])
def test_input_range_from_the_spec_pins_the_input_quantizer(name):
    """Images covering a sliver of the valid range would leave the input quantizer that narrow."""
    noise = dfq_plugins.synthesize(make_tiny(), "noise", input_spec=TINY_SPEC, num_samples=16, cache=False)
    narrow = CalibrationSet(noise.images * 0.1, 8, manifest=noise.manifest)
    lo, hi = float(TINY_SPEC.bounds()[0].min()), float(TINY_SPEC.bounds()[1].max())

    def input_ranges(input_range: str) -> list[tuple[float, float]]:
        tc = make_toolchain({"name": name, "input_range": input_range})
        prepared = tc.calibrate(tc.prepare(make_tiny(), QuantScheme.parse("w8a8"), (narrow[0],)), narrow)
        readers = [prepared.get_submodule(n.target) for n in prepared.graph.nodes
                   if n.op == "call_module" and n.args and getattr(n.args[0], "op", None) == "placeholder"]
        return [(float(m.min_val), float(m.max_val)) for m in readers if hasattr(m, "min_val")]

    data, spec = input_ranges("data"), input_ranges("spec")
    assert data and max(abs(v) for r in data for v in r) < 0.5
    assert spec == [(pytest.approx(lo), pytest.approx(hi))] * len(spec) and len(spec) == len(data)
    with pytest.raises(ValueError, match="InputSpec"):
        make_toolchain({"name": name, "input_range": "spec"}).quantize(make_tiny(), QuantScheme.parse("w8a8"),
                                                                       CalibrationSet(torch.randn(8, 3, 16, 16), 8))
