"""Fault matrix, configuration: every recipe key, section and --set value is checked against the
declared options before any work, strings are coerced by declared type, errors name the key."""
from __future__ import annotations

import warnings

import pytest

from dfq_plugins import plugins
from dfq_plugins.api import make_distiller
from dfq_plugins.cli import build_parser, main
from dfq_plugins.cli.common import settings as _settings


@pytest.fixture
def no_work(monkeypatch):
    """Any synthesis or model load means validation came too late."""
    import dfq_plugins.api

    def forbidden(*_a, **_k):
        raise AssertionError("work started before the configuration was checked")
    monkeypatch.setattr(dfq_plugins.api, "_synthesize_now", forbidden)  # looked up at call time, never bound elsewhere


def settings(argv: list[str], recipe: str | None = None, tmp_path=None) -> dict:
    if recipe is not None:
        path = tmp_path / "recipe.toml"
        path.write_text(recipe)
        argv = [*argv, "--recipe", str(path)]
    args = build_parser().parse_args(argv)
    return _settings(args, argv[0])


@pytest.mark.parametrize("text", ["False", "false", "no", "0", "off"])
def test_false_in_any_spelling_turns_an_option_off(text):
    s = settings(["quantize", "--set", f"zeroq.clip={text}"])
    assert s["sources"]["zeroq"]["clip"] is False
    assert plugins.instantiate("synthesizers", "zeroq", s["sources"]["zeroq"]).clip is False


@pytest.mark.parametrize("recipe, message", [
    ("imagess = 8\n", "unknown key 'imagess'; did you mean 'images'?"),
    ("[distiller.kd]\nsteps = 2\n", "unknown key 'distiller'; did you mean 'distillers'?"),
    ("[source.zeroq]\niterations = 5\n", "'source' is a value, not a table"),
    ("[toolchain.nncf]\npreset = 'mixed'\n", "'toolchain' is a value, not a table"),
    ("seeds = '0,1'\n", "'seeds' is not read here (it is a setting of dfq bench)"),
    ("[sources.zeroq]\niterations = 2.7\n", "option 'iterations' = 2.7: Input should be a valid integer"),
    ("[sources.zeroq]\niteratons = 5\n", "unknown option 'iteratons'; did you mean 'iterations'?"),
    ("[sources.zeroqq]\niterations = 5\n", "Did you mean 'zeroq'?"),
    ("[distillers.kd]\nlrr = 0.1\n", "unknown option 'lrr'; did you mean 'lr'?"),
    ("[distillers.kd]\nlr = true\n", "option 'lr' = True: a number is expected, not true/false"),
    ("[sources.zeroq]\niterations = false\n", "option 'iterations' = False: a number is expected"),
    ("[distillers]\nkd = 3\n", "[distillers] holds one table per name"),
    ("images = 0\n", "images = 0: must be at least 1"),
    ("images = 'many'\n", "images = 'many': Input should be a valid integer"),
])
def test_a_bad_recipe_is_refused_naming_the_key(tmp_path, recipe, message):
    with pytest.raises(Exception, match=_escaped(message)):
        settings(["quantize"], recipe, tmp_path)


def _escaped(text: str) -> str:
    import re

    return re.escape(text)


def test_strings_are_coerced_by_declared_type(tmp_path):
    s = settings(["quantize"], "[sources.zeroq]\nlr = \"0.1\"\niterations = \"20\"\n", tmp_path)
    assert s["sources"]["zeroq"]["lr"] == 0.1 and s["sources"]["zeroq"]["iterations"] == 20


@pytest.mark.parametrize("argv, message", [
    (["quantize", "--batch-size", "0"], "batch_size = 0: must be at least 1"),
    (["quantize", "--steps", "-3", "--distill", "kd"], "steps = -3: must be at least 0"),
    (["quantize", "--distill", "kdd"], "no distiller named 'kdd'"),
    (["quantize", "--distill", "kd", "--distill-set", "kd.lrr=0.1"], "unknown option 'lrr'"),
    (["quantize", "--distill", "kd", "--distill-set", "kd.lr=abc"], "option 'lr' = 'abc'"),
    (["quantize", "--source", "zeroqq"], "Did you mean 'zeroq'"),
    (["quantize", "--toolchain", "torch-ao"], "no toolchain named 'torch-ao'"),
    (["bench", "--seeds", "0,-1"], "seeds = '-1': must be at least 0"),
    (["synthesize", "--set", "zeroq.iterations=2.7"], "option 'iterations' = 2.7"),
])
def test_the_cli_refuses_bad_values_before_any_work(no_work, capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_budget_inside_the_warm_up_is_refused_before_any_work(no_work, capsys):
    """adadfq with 30 steps against its 100-step warm-up would make zero student updates. The advice is
    more steps, not a shorter warm-up: the warm-up trains the generator (30 steps with a 6-step warm-up
    took ResNet-20 W4A4 from 79.83% to 20.49%)."""
    assert main(["quantize", "--distill", "adadfq", "--steps", "30"]) == 2
    err = capsys.readouterr().err
    assert "30 steps with a 100-step warm-up would never update the student" in err
    assert "give at least --steps 200" in err and "warmup_steps=" not in err


def test_a_loop_without_a_generator_may_shorten_its_warm_up(no_work, capsys):
    assert main(["quantize", "--distill", "kd", "--steps", "30", "--distill-set", "kd.warmup_steps=40"]) == 2
    assert "--distill-set kd.warmup_steps=6" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["gdfq", "adadfq", "causal"])
def test_an_online_loop_with_few_student_steps_warns(name):
    """24 student steps of adadfq took ResNet-20 W4A4 from 79.83% to 20.49%; 100 took it to 84.12%."""
    with pytest.warns(UserWarning, match=r"only 50 student steps after the 100-step warm-up.*at least --steps 200"):
        make_distiller(name, steps=150)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_distiller(name, steps=200)
        make_distiller("kd", steps=5)  # no generator to warm up: the warning is the online loops'


def test_export_still_happens_when_the_test_images_are_missing(tmp_path, capsys):
    """The accuracy check is skipped (and says why); the quantized model is exported all the same."""
    from dfq_plugins import hookimpl
    from dfq_plugins.errors import AssetsMissingError
    from dfq_plugins.models.base import ModelDef

    from ..conftest import TINY_SPEC, make_tiny

    def missing():
        raise AssetsMissingError("no test images here")

    class NoTestSet:
        @hookimpl
        def dfq_register_models(self, register):
            register("tiny-no-test", ModelDef("tiny-no-test", lambda: (make_tiny(), TINY_SPEC), test_set=missing))

    plugins.register_plugin(NoTestSet(), name="no-test-set")
    try:
        out = tmp_path / "q.pt2"
        assert main(["quantize", "--model", "tiny-no-test", "--source", "noise", "--images", "8",
                     "--toolchain", "torchao-pt2e", "--export", str(out), "--quiet"]) == 0
    finally:
        plugins.unregister_plugin("no-test-set")
    assert "no accuracy check: no test images here" in capsys.readouterr().out
    assert out.exists() and out.stat().st_size > 0


@pytest.mark.parametrize("setting, message", [
    ("kd.lr=-1", "kd.lr = -1: must be > 0"),
    ("kd.optimizer=adamw", "kd.optimizer = 'adamw': choose one of sgd, adam"),
    ("kd.momentum=1", "kd.momentum = 1: must be in [0, 1)"),
    ("kd.temperature=0", "kd.temperature = 0: must be > 0"),
    ("kd.lr_milestones=[0.5,2]", "kd.lr_milestones = [0.5, 2.0]"),
])
def test_distiller_options_out_of_range_are_refused_before_any_work(tmp_path, capsys, monkeypatch, setting, message):
    """The defect: kd.lr=-1 synthesized and calibrated first, then failed with torch's 'Invalid learning rate'."""
    from dfq_plugins import api
    from dfq_plugins.cli import main
    from tests.test_own_model_cli import NET, SPEC

    (tmp_path / "net.py").write_text(NET)
    monkeypatch.setattr(api, "_synthesize_now", lambda *a, **k: pytest.fail("synthesis ran before the check"))
    assert main(["quantize", "--model", f"{tmp_path / 'net.py'}:build", *SPEC, "--distill", "kd", "--steps", "2",
                 "--distill-set", setting, "--quiet"]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "calibration data" not in captured.out


def test_reconstruct_and_generator_options_have_ranges_too():
    from dfq_plugins.api import make_distiller
    from dfq_plugins.config import ConfigError

    for bad, message in [({"name": "reconstruct", "qdrop": 1.5}, "reconstruct.qdrop = 1.5: must be in [0, 1]"),
                         ({"name": "adadfq", "lambda_u": 2}, "adadfq.lambda_u = 2: must be in [0, 1]"),
                         ({"name": "causal", "interventions": 0}, "causal.interventions = 0: must be >= 1"),
                         ({"name": "gdfq", "generator_lr": 0}, "gdfq.generator_lr = 0: must be > 0")]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            make_distiller(bad)
