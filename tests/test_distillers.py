"""The distillation loops on real small models: they learn, resume exactly, and keep their contracts."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

import dfq_plugins
from dfq_plugins import CalibrationSet, QuantScheme
from dfq_plugins.api import make_distiller, make_toolchain
from dfq_plugins.config import ConfigError
from dfq_plugins.diffusion import DiffusionLevels
from dfq_plugins.distillers.causal import divergence
from dfq_plugins.distillers.loop import lr_factor
from dfq_plugins.errors import CorruptArtifactError
from dfq_plugins.losses import kd_loss
from dfq_plugins.teacher import Teacher

from .conftest import TINY_SPEC, make_trained_tiny

W4A4 = QuantScheme.parse("w4a4")


def colour_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of the tiny model's 4-class colour task (red, green, blue, dark) and their classes."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    pixels = 0.35 + 0.1 * torch.randn(n, 3, 16, 16, generator=g)
    shift = torch.zeros(n, 3, 1, 1)
    shift[labels < 3, labels[labels < 3]] = 0.3
    pixels = pixels + shift - 0.25 * (labels == 3).float().view(-1, 1, 1, 1)
    return (pixels.clamp(0, 1) - 0.5) / 0.25, labels


@pytest.fixture(scope="module")
def trained():
    return make_trained_tiny()


def calibration_set(n: int = 64) -> CalibrationSet:
    x, _ = colour_images(n, seed=1)
    return CalibrationSet(x, batch_size=16, manifest={"input_spec": TINY_SPEC.to_dict()})


def student_for(model, toolchain: str = "torch-ao-fx", scheme: QuantScheme = W4A4):
    chain = make_toolchain(toolchain)
    return chain, chain.quantize(model, scheme, calibration_set(), trainable=True)


@torch.no_grad()
def teacher_gap(teacher, student, x: torch.Tensor) -> float:
    """KL(teacher || student) on held-out images: what distillation should shrink."""
    return float(kd_loss(student(x), teacher(x), 1.0, "batchmean"))


@pytest.mark.compat
def test_kd_brings_a_low_bit_student_closer_to_its_teacher(trained):
    chain, student = student_for(trained, scheme=QuantScheme.parse("w2a4"))  # w4a4 already agrees on this task
    held_out, _ = colour_images(256, seed=7)
    chain.student_eval(student)
    before = teacher_gap(trained, student, held_out)
    kd = make_distiller({"name": "kd", "lr": 0.01, "checkpoint_every": 0}, steps=60)
    kd.distill(Teacher(make_trained_tiny(), TINY_SPEC), student, calibration_set(), toolchain=chain, progress=False)
    after = teacher_gap(trained, student, held_out)
    assert after < 0.7 * before, (before, after)
    assert kd.last_run.step == 60 and len(kd.last_run.history) == 6


def test_interrupted_run_resumes_to_the_same_student(trained, tmp_path):
    cs = calibration_set()
    chain, reference = student_for(trained)
    config = {"name": "kd", "lr": 0.01, "checkpoint_every": 5}
    make_distiller(config, steps=12).distill(Teacher(make_trained_tiny(), TINY_SPEC), reference, cs, toolchain=chain,
                                             progress=False, workdir=tmp_path / "a", key="k")

    chain, student = student_for(trained)
    kd = make_distiller(config, steps=12)
    original_step = kd.train_step

    def interrupt_at_8(run, step):
        if step == 8:
            raise KeyboardInterrupt
        return original_step(run, step)

    kd.train_step = interrupt_at_8
    with pytest.raises(KeyboardInterrupt):
        kd.distill(Teacher(make_trained_tiny(), TINY_SPEC), student, cs, toolchain=chain, progress=False,
                   workdir=tmp_path / "b", key="k")
    assert (tmp_path / "b" / "checkpoint.safetensors").exists()

    chain, resumed = student_for(trained)  # a fresh process: new student, new distiller, same workdir
    kd = make_distiller(config, steps=12)
    kd.distill(Teacher(make_trained_tiny(), TINY_SPEC), resumed, cs, toolchain=chain, progress=False,
               workdir=tmp_path / "b", key="k")
    ref, got = reference.state_dict(), resumed.state_dict()
    for name, value in ref.items():
        assert torch.equal(value, got[name]), name


def test_a_finished_online_run_resumes_in_a_new_process_after_its_observers_were_reset(trained, tmp_path):
    """adadfq resets the activation observers before resuming; a per-channel observer is then
    empty and the checkpoint's ranges must still load (a rerun of `dfq bench` failed here)."""
    cs = calibration_set()
    config = {"name": "adadfq", "warmup_steps": 2, "observer_steps": 2, "batch_size": 8, "checkpoint_every": 0}
    chain, first = student_for(trained, "torchao-pt2e")
    make_distiller(config, steps=4).distill(Teacher(make_trained_tiny(), TINY_SPEC), first, cs, toolchain=chain,
                                            progress=False, workdir=tmp_path / "run", key="k")
    chain, again = student_for(trained, "torchao-pt2e")  # a new process: new student, same finished run
    rerun = make_distiller(config, steps=4)
    rerun.distill(Teacher(make_trained_tiny(), TINY_SPEC), again, cs, toolchain=chain, progress=False,
                  workdir=tmp_path / "run", key="k")
    assert rerun.last_run.step == 4
    for name, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), (name, value, again.state_dict()[name])


def test_sigterm_checkpoints_like_ctrl_c(trained, tmp_path):
    import os
    import signal

    chain, student = student_for(trained)
    kd = make_distiller({"name": "kd", "checkpoint_every": 0}, steps=10)
    original_step = kd.train_step

    def terminate_at_4(run, step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return original_step(run, step)

    kd.train_step = terminate_at_4
    with pytest.raises(KeyboardInterrupt):
        kd.distill(Teacher(make_trained_tiny(), TINY_SPEC), student, calibration_set(), toolchain=chain,
                   progress=False, workdir=tmp_path, key="k")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "checkpoint.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["dfq_checkpoint"])["step"] in (4, 5)
    assert signal.getsignal(signal.SIGTERM) is not None


def test_a_checkpoint_of_another_run_is_refused(trained, tmp_path):
    cs = calibration_set()
    chain, student = student_for(trained)
    make_distiller({"name": "kd"}, steps=2).distill(Teacher(make_trained_tiny(), TINY_SPEC), student, cs,
                                                   toolchain=chain, progress=False, workdir=tmp_path, key="one")
    with pytest.raises(CorruptArtifactError, match="another run"):
        make_distiller({"name": "kd"}, steps=4).distill(Teacher(make_trained_tiny(), TINY_SPEC), student, cs,
                                                       toolchain=chain, progress=False, workdir=tmp_path,
                                                       key="two")


def test_activation_ranges_freeze_after_the_observer_window(trained):
    chain, student = student_for(trained)
    scales = lambda: {n: m.scale.clone() for n, m in student.named_modules()
                      if hasattr(m, "observer_enabled") and not n.endswith("weight_fake_quant")}
    make_distiller({"name": "kd", "observer_steps": 3}, steps=8).distill(
        Teacher(make_trained_tiny(), TINY_SPEC), student, calibration_set(), toolchain=chain, progress=False)
    frozen = scales()
    assert all(int(m.observer_enabled) == 0 for n, m in student.named_modules()
               if hasattr(m, "observer_enabled") and not n.endswith("weight_fake_quant"))
    with torch.no_grad():
        student(colour_images(32, seed=3)[0] * 3)  # wider inputs would move an observing range
    assert all(torch.equal(frozen[n], s) for n, s in scales().items())


def test_pt2e_students_train_with_frozen_activation_ranges(trained):
    chain, student = student_for(trained, "torchao-pt2e")
    weights = {n: p.detach().clone() for n, p in student.named_parameters()}
    make_distiller({"name": "kd", "lr": 0.01}, steps=4).distill(
        Teacher(make_trained_tiny(), TINY_SPEC), student, calibration_set(), toolchain=chain, progress=False)
    assert any(not torch.equal(weights[n], p) for n, p in student.named_parameters())
    from dfq_plugins.toolchain import activation_fake_quants

    acts = activation_fake_quants(student)
    assert acts and all(int(m.observer_enabled) == 0 for _, m in acts)
    assert len(acts) < sum(hasattr(m, "observer_enabled") for m in student.modules())  # weights still observed
    x, labels = colour_images(64, seed=5)
    assert dfq_plugins.evaluate(chain.convert(student), x, labels) > 50.0


def test_nncf_ranges_are_learned_only_when_asked(trained):
    for ranges, should_move in (("frozen", False), ("learned", True)):
        chain, student = student_for(trained, "nncf", QuantScheme.parse("w4a4-symact"))
        params = chain.range_parameters(student)
        assert params, "NNCF's quantizer scales should be found"
        before = [p.detach().clone() for p in params]
        make_distiller({"name": "kd", "lr": 0.01, "ranges": ranges}, steps=5).distill(
            Teacher(make_trained_tiny(), TINY_SPEC), student, calibration_set(), toolchain=chain, progress=False)
        moved = any(not torch.equal(b, p) for b, p in zip(before, params))
        assert moved == should_move, ranges


def test_bn_statistics_stay_frozen_unless_batch_mode_is_asked(trained):
    for mode, should_move in (("running", False), ("batch", True)):
        chain, student = student_for(trained)
        stats = {n: b.clone() for n, b in student.named_buffers() if n.endswith("running_mean")}
        make_distiller({"name": "kd", "bn_mode": mode}, steps=3).distill(
            Teacher(make_trained_tiny(), TINY_SPEC), student, calibration_set(), toolchain=chain, progress=False)
        moved = any(not torch.equal(b, dict(student.named_buffers())[n]) for n, b in stats.items())
        assert moved == should_move, mode
        assert not student.training  # handed back ready for conversion


def test_learned_ranges_on_a_toolchain_without_learnable_ranges_is_a_clear_error(trained):
    """FX, PT2E and NNCF all learn ranges now; a third-party toolchain that offers none must say so."""
    from dfq_plugins.toolchain import Toolchain

    class ObserverOnly(Toolchain):
        name = "observer-only"

        def make_ranges_learnable(self, student):
            return []

    _, student = student_for(trained)
    chain = ObserverOnly()
    with pytest.raises(ValueError, match="ranges='learned'.*observer-only"):
        make_distiller({"name": "kd", "ranges": "learned"}, steps=2).distill(
            Teacher(make_trained_tiny(), TINY_SPEC), student, calibration_set(), toolchain=chain, progress=False)


def test_offline_distiller_without_a_set_says_what_to_pass(trained):
    chain, student = student_for(trained)
    with pytest.raises(ValueError, match="pass source=CalibrationSet"):
        make_distiller("kd", steps=2).distill(Teacher(make_trained_tiny(), TINY_SPEC), student, None,
                                              toolchain=chain, progress=False)


def test_adadfq_trains_only_its_generator_during_warm_up(trained):
    chain, student = student_for(trained)
    weights = {n: p.detach().clone() for n, p in student.named_parameters()}
    ada = make_distiller({"name": "adadfq", "batch_size": 12, "warmup_steps": 4, "observer_steps": 4}, steps=5)
    original, after_warm_up = ada.train_step, {}

    def step_and_look(run, step):
        out = original(run, step)
        if step == 3:  # the last warm-up step
            after_warm_up.update({n: p.detach().clone() for n, p in student.named_parameters()})
            after_warm_up["_losses"] = dict(out)
        return out

    ada.train_step = step_and_look
    ada.distill(Teacher(make_trained_tiny(), TINY_SPEC), student, None, toolchain=chain, progress=False)
    assert all(torch.equal(weights[n], after_warm_up[n]) for n in weights)
    assert "q" not in after_warm_up["_losses"]
    assert any(not torch.equal(weights[n], p) for n, p in student.named_parameters())  # then it trains
    gen = ada.last_run.trainables["generator"].module
    assert gen(torch.randn(3, gen.code_dim()), torch.tensor([0, 1, 2])).shape == (3, *TINY_SPEC.shape)


def test_adadfq_margin_keeps_normalised_entropy_in_its_band():
    ada = make_distiller("adadfq")
    d = torch.tensor([[9.0, 0, 0, 0], [1.0, 0.5, 0, 0], [0.0, 0, 0, 0]])
    loss, h = ada.margin_loss(d)
    assert float(h.min()) == 0.0 and float(h.max()) == pytest.approx(1.0)  # batch-min normalisation
    expected = (ada.lambda_l - 0.0) / 3 + (1.0 - ada.lambda_u) / 3
    assert float(loss) == pytest.approx(expected + max(0.0, ada.lambda_l - float(h[1])) / 3
                                        + max(0.0, float(h[1]) - ada.lambda_u) / 3)
    plain = make_distiller({"name": "adadfq", "batch_min_normalisation": False})
    _, h_plain = plain.margin_loss(d)
    assert float(h_plain[2]) == pytest.approx(1.0) and float(h_plain[0]) < 0.01


def test_adadfq_student_learns_after_warm_up(trained):
    chain, student = student_for(trained)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    ada = make_distiller({"name": "adadfq", "batch_size": 12, "warmup_steps": 2, "observer_steps": 2}, steps=5)
    ada.distill(Teacher(make_trained_tiny(), TINY_SPEC), student, None, toolchain=chain, progress=False)
    assert any(not torch.equal(before[n], p) for n, p in student.named_parameters())
    assert math.isfinite(ada.last_run.history[-1]["q"]) if ada.last_run.history else True


def test_causal_divergences_and_interventions(trained):
    p = torch.softmax(torch.randn(5, 4), 1)
    assert float(divergence(p, p, "kl")) == pytest.approx(0.0, abs=1e-6)
    assert float(divergence(p, p.roll(1, 0), "js")) <= math.log(2) + 1e-6
    causal = make_distiller({"name": "causal", "batch_size": 12, "interventions": 3})
    z = torch.randn(4, 4).repeat_interleave(3, 0)  # identical predictions under every intervention
    align, inv = causal.discrepancy_loss(z, z)
    assert float(align) == pytest.approx(0.0, abs=1e-5) and float(inv) == pytest.approx(0.0, abs=1e-5)
    for space in ("latent", "pixel"):
        chain, student = student_for(trained)
        c = make_distiller({"name": "causal", "batch_size": 12, "interventions": 3, "intervention_space": space,
                            "warmup_steps": 1, "observer_steps": 1}, steps=3)
        c.distill(Teacher(make_trained_tiny(), TINY_SPEC), student, None, toolchain=chain, progress=False)
        x, y = c.intervened_images(c.last_run, 0)
        assert x.shape == (12, *TINY_SPEC.shape) and torch.equal(y, y.view(4, 3)[:, :1].expand(4, 3).reshape(-1))
    with pytest.raises(ValueError, match="interventions"):
        make_distiller({"name": "causal", "interventions": 1})


def _same_content_gap(c, run) -> float:
    """Mean |x_k - x_k'| between neighbouring interventions of one content, over the mean image size."""
    with torch.no_grad():
        x, _ = c.intervened_images(run, 10_000)
    xs = x.view(-1, c.interventions, *x.shape[1:])
    return float((xs - xs.roll(1, dims=1)).abs().mean() / x.abs().mean())


def test_causal_style_diversity_keeps_the_interventions_apart(trained):
    causal = make_distiller({"name": "causal", "batch_size": 12, "interventions": 3})
    same = torch.randn(4, 1, 3, 8, 8).expand(4, 3, 3, 8, 8).reshape(12, 3, 8, 8)
    styles = torch.randn(12, 5)
    assert float(causal.diversity_loss(same, styles)) > 1e4  # copies under different styles: the term is large
    assert float(causal.diversity_loss(torch.randn(12, 3, 8, 8), styles)) < 2
    # off by default and then absent from the config, so every cached causal run keeps its key
    assert "style_diversity" not in causal.config_dict()
    assert make_distiller({"name": "causal", "style_diversity": 1.0}).config_dict()["style_diversity"] == 1.0
    with pytest.raises(ValueError, match="latent"):
        make_distiller({"name": "causal", "style_diversity": 1.0, "intervention_space": "pixel"})
    for bad in (float("nan"), -1.0, "strong"):  # a careless value is refused before any training
        with pytest.raises(ConfigError, match="style_diversity"):
            make_distiller({"name": "causal", "style_diversity": bad})
    gaps = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        chain, student = student_for(trained)
        c = make_distiller({"name": "causal", "batch_size": 12, "interventions": 3, "style_diversity": weight,
                            "generator_lr": 0.01, "warmup_steps": 1, "observer_steps": 1,
                            "checkpoint_every": 0}, steps=40)
        c.distill(Teacher(make_trained_tiny(), TINY_SPEC), student, None, toolchain=chain, progress=False)
        gaps[weight] = _same_content_gap(c, c.last_run)
    assert gaps[1.0] > 1.5 * gaps[0.0], gaps


def _three_still_gdfq_steps(chain, student, **options) -> None:
    """Three gdfq steps at lr 1e-9: the weights cannot move, so only the range handling changes a range."""
    config = {"name": "gdfq", "batch_size": 8, "warmup_steps": 1, "lr": 1e-9, "checkpoint_every": 0, **options}
    make_distiller(config, steps=3).distill(Teacher(make_trained_tiny(), TINY_SPEC), student, None,
                                            toolchain=chain, progress=False)


def test_online_loops_keep_the_calibrated_activation_ranges_by_default(trained):
    """By default the learned ranges start from the calibration and only train from there (docs/claims.md:
    GDFQ 68.78 -> 82.62 on ResNet-56 W4A4); ``recalibrate`` with an observer window re-sets them on the
    generator's images. Fails if the default resets the observers or runs them at step 0."""
    from dfq_plugins.toolchain import activation_fake_quants

    def act_scales(student):
        return {n: m.scale.detach().reshape(-1).clone() for n, m in activation_fake_quants(student)}

    moved = {}
    for keep in (True, False):
        torch.manual_seed(0)
        chain, student = student_for(trained, "torchao-pt2e")
        calibrated = act_scales(student)
        # keeping them is the default
        _three_still_gdfq_steps(chain, student, ranges="learned",
                                **({} if keep else {"recalibrate": True, "observer_steps": 2}))
        after = act_scales(student)
        assert after.keys() == calibrated.keys() and after
        moved[keep] = max(float(((after[n] - s).abs() / s).max()) for n, s in calibrated.items())
    assert moved[True] < 1e-4, moved  # Adam at lr 1e-9 cannot move a range: only a reset could
    assert moved[False] > 1e-2, moved  # the generator's images re-set them


def test_online_loops_with_observed_ranges_start_from_the_calibrated_observers(trained):
    """With ``ranges="observe"`` (the default) the observers go on from their calibrated statistics, so the
    ranges move a little; ``recalibrate`` empties them first and the generator's images alone set them
    (on this tiny model they then move 20 times as far). Fails if the default resets the observers."""
    from dfq_plugins.toolchain import activation_fake_quants

    def act_ranges(student):
        return {n: (float(m.activation_post_process.min_val), float(m.activation_post_process.max_val))
                for n, m in activation_fake_quants(student)}

    moved = {}
    for recalibrate in (False, True):
        torch.manual_seed(0)
        chain, student = student_for(trained)
        calibrated = act_ranges(student)
        _three_still_gdfq_steps(chain, student, **({"recalibrate": True} if recalibrate else {}))
        after = act_ranges(student)
        assert after.keys() == calibrated.keys() and after
        moved[recalibrate] = max(max(abs(lo1 - lo0), abs(hi1 - hi0)) for (lo0, hi0), (lo1, hi1)
                                 in zip(calibrated.values(), after.values()))
    assert moved[True] > 5 * moved[False], moved


def test_diffdfq_level_only_moves_toward_clean_samples(trained):
    cs = calibration_set()
    cs.labels = torch.zeros(cs.num_samples, dtype=torch.long)
    DiffusionLevels.attach(cs, num_levels=6, beta_start=0.01, beta_end=0.2, schedule_steps=10)
    chain, student = student_for(trained)
    diff = make_distiller({"name": "diffdfq", "epoch_steps": 2, "batch_size": 16}, steps=10)
    diff.distill(Teacher(make_trained_tiny(), TINY_SPEC), student, cs, toolchain=chain, progress=False)
    levels = diff.last_run.extra["levels"]
    assert len(levels) == 5
    assert all(a >= b for a, b in itertools.pairwise(levels))
    with pytest.raises(ValueError, match="no diffusion levels"):
        make_distiller("diffdfq", steps=2).distill(Teacher(make_trained_tiny(), TINY_SPEC), student,
                                                   calibration_set(), toolchain=chain, progress=False)


def test_lr_schedules():
    assert lr_factor("constant", 50, 100, (), 0.1) == 1.0
    assert lr_factor("cosine", 0, 100, (), 0.1) == 1.0 and lr_factor("cosine", 100, 100, (), 0.1) < 1e-9
    assert lr_factor("multistep", 74, 100, (0.5, 0.75), 0.1) == pytest.approx(0.1)
    assert lr_factor("multistep", 75, 100, (0.5, 0.75), 0.1) == pytest.approx(0.01)


def test_quantize_with_distill_returns_the_converted_model_and_caches_the_run(trained):
    x, labels = colour_images(128, seed=9)
    cs = calibration_set()
    q = dfq_plugins.quantize(trained, input_spec=TINY_SPEC, source=cs, scheme="w4a4", distill="kd", steps=6,
                             progress=False)
    assert not hasattr(q, "observer_enabled")
    assert dfq_plugins.evaluate(q, x, labels) > 50.0
    from dfq_plugins.io import cache_root

    runs = list((cache_root() / "distill").glob("kd-*/checkpoint.safetensors"))
    assert len(runs) == 1


def test_bench_rows_record_calibrated_and_distilled_accuracy(resnet20, tmp_path):
    from dfq_plugins.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--quiet", "--model", "cifar10-resnet20", "--toolchain", "torch-ao-fx", "--scheme",
                 "w4a4", "--rows", "real+kd,noise,real+reconstruct+kd", "--images", "32", "--steps", "3",
                 "--distill-set", "reconstruct.steps=2", "--test-limit", "100", "--json", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert {(r["source"], r["distill"]) for r in records} == {("real", "kd"), ("noise", None),
                                                              ("real", "reconstruct+kd")}
    distilled = next(r for r in records if r["distill"] == "kd")
    assert distilled["distill_steps"] == 3 and distilled["distill_config"]["steps"] == 3
    assert "top1_calibrated" in distilled
    assert distilled["student_ranges"] == "histogram"  # W4A4's ahist students start from the histogram search
    assert "student_ranges" not in next(r for r in records if r["distill"] is None)
    assert "real+kd" in (tmp_path / "bench.md").read_text()
    chained = next(r for r in records if r["distill"] == "reconstruct+kd")
    assert [s.get("ranges_kept", False) for s in chained["distill_stages"]] == [False, True]
    assert chained["reconstruct"]["blocks"] == 11  # ResNet-20: stem, 9 residual blocks, head
    assert 0 <= chained["reconstruct"]["bn_mismatch"] < 0.3  # real images pass the check


@pytest.mark.parametrize("toolchain", ["torch-ao-fx", "torchao-pt2e"])
def test_measuring_a_student_leaves_its_ranges_alone(trained, toolchain):
    chain, student = student_for(trained, toolchain)

    def ranges() -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in student.state_dict().items()
                if k.endswith(("min_val", "max_val", "scale", "zero_point"))}

    before = ranges()
    assert before
    far, _ = colour_images(64, seed=9)
    with torch.no_grad(), chain.measuring(student):
        student(far * 4)  # far outside the calibrated ranges
    after = ranges()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert student.training  # the mode comes back too
    chain.student_eval(student)  # the hazard it guards against: eval mode alone keeps observing
    with torch.no_grad():
        student(far * 4)
    assert any(not torch.equal(before[k], v) for k, v in ranges().items())


def test_distiller_speed_times_the_steady_step_against_its_floor(trained):
    """`dfq speed --distill`: a step against the passes it cannot avoid at its batch (issue 23). The
    generator's part is in the floor only where there is a generator, and timing the floor (observers
    off) leaves an observing student observing."""
    from dfq_plugins.bench.distill_speed import floor_seconds, measure_distiller_speed, steady_run, step_seconds

    teacher, chain, cs = Teacher(trained, TINY_SPEC), make_toolchain("torch-ao-fx"), calibration_set()
    rows = {}
    for name in ("kd", "gdfq"):
        d = make_distiller({"name": name, "batch_size": 8, "warmup_steps": 1, "observer_steps": 1}
                           if name == "gdfq" else {"name": name, "batch_size": 8})
        rows[name] = measure_distiller_speed(teacher, d, student_for(trained)[1], chain, cs, steps=2, repeats=1)
    for row in rows.values():
        parts = row["teacher_forward_s"] + row.get("generator_forward_backward_s", 0) + row["student_forward_backward_s"]
        assert row["floor_s"] == pytest.approx(parts, rel=1e-3) and row["step_s"] > 0
        assert row["ratio_to_floor"] == pytest.approx(row["step_s"] / row["floor_s"], rel=1e-2)
    assert "generator_forward_backward_s" not in rows["kd"] and rows["gdfq"]["generator_forward_backward_s"] > 0
    assert rows["gdfq"]["ranges"] == "observe" and rows["kd"]["batch"] == 8

    student = student_for(trained)[1]
    run = steady_run(teacher, make_distiller({"name": "gdfq", "batch_size": 8, "warmup_steps": 0,
                                              "observer_steps": 0}), student, chain, cs)
    step_seconds(run, 1)

    def observing() -> set[int]:
        return {int(m.observer_enabled[0]) for m in student.modules() if hasattr(m, "observer_enabled")}

    assert observing() == {1}
    floor_seconds(run, 1)
    assert observing() == {1}
    with pytest.raises(ValueError, match="block by block"):
        steady_run(teacher, make_distiller("reconstruct"), student_for(trained)[1], chain, cs)
