"""The calibration cache keys on the InputSpec: a corrected spec is never served the old set."""
from __future__ import annotations

import os

import pytest

import dfq_plugins
from dfq_plugins import InputSpec
from dfq_plugins.api import calibration_cache_path, make_synthesizer
from dfq_plugins.synthesizers.zeroq import ZeroQSynthesizer
from dfq_plugins.teacher import Teacher

from .conftest import TINY_SPEC, make_tiny

SOURCE = {"name": "zeroq", "iterations": 2}


def other_spec() -> InputSpec:
    d = TINY_SPEC.to_dict()
    d["mean"] = [0.2, 0.2, 0.2]
    return InputSpec.from_dict(d)


def test_a_corrected_spec_gets_its_own_set():
    first = dfq_plugins.synthesize(make_tiny(), SOURCE, input_spec=TINY_SPEC, num_samples=8, progress=False)
    fixed = dfq_plugins.synthesize(make_tiny(), SOURCE, input_spec=other_spec(), num_samples=8, progress=False)
    assert fixed.content_hash() != first.content_hash()
    assert InputSpec.from_dict(fixed.manifest["input_spec"]) == other_spec()


@pytest.fixture
def legacy_set():
    """A set cached under the key sets had before the spec was part of it."""
    cs = dfq_plugins.synthesize(make_tiny(), SOURCE, input_spec=TINY_SPEC, num_samples=8, progress=False)
    teacher = Teacher(make_tiny(), TINY_SPEC)
    synth = make_synthesizer(SOURCE)
    new = calibration_cache_path(teacher, synth, 8, 0)
    old = calibration_cache_path(teacher, synth, 8, 0, with_spec=False)
    os.replace(new, old)
    os.replace(new.with_suffix(".json"), old.with_suffix(".json"))
    return cs, new, old


def test_a_legacy_set_made_with_the_same_spec_is_reused(legacy_set, monkeypatch):
    cs, new, old = legacy_set
    monkeypatch.setattr(ZeroQSynthesizer, "optimize_batch", lambda *a, **k: pytest.fail("synthesized again"))
    again = dfq_plugins.synthesize(make_tiny(), SOURCE, input_spec=TINY_SPEC, num_samples=8, progress=False)
    assert again.content_hash() == cs.content_hash()
    assert new.exists() and not old.exists()


def test_a_legacy_set_made_with_another_spec_is_not_served(legacy_set):
    cs, _new, old = legacy_set
    other = dfq_plugins.synthesize(make_tiny(), SOURCE, input_spec=other_spec(), num_samples=8, progress=False)
    assert other.content_hash() != cs.content_hash()
    assert old.exists()  # left for the spec it was made with


def test_dfq_cache_lists_shows_and_clears_only_when_confirmed(capsys):
    from dfq_plugins.cli import main

    cs = dfq_plugins.synthesize(make_tiny(), SOURCE, input_spec=TINY_SPEC, num_samples=8, progress=False)
    assert main(["cache", "list"]) == 0
    listing = capsys.readouterr().out
    assert "zeroq, 8 images, seed 0" in listing and "1 entries" in listing
    name = listing.split()[1]
    assert main(["cache", "show", name[:12]]) == 0
    assert cs.content_hash() in capsys.readouterr().out
    assert main(["cache", "clear", "calibration"]) == 2  # not without --yes
    assert "add --yes" in capsys.readouterr().err
    assert main(["cache", "clear", "calibration", "--yes"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert main(["cache", "list"]) == 0
    assert "0 entries" in capsys.readouterr().out


def test_a_reused_set_says_so(caplog):
    import logging

    dfq_plugins.synthesize(make_tiny(), SOURCE, input_spec=TINY_SPEC, num_samples=8, progress=False)
    with caplog.at_level(logging.INFO, logger="dfq_plugins"):
        dfq_plugins.synthesize(make_tiny(), SOURCE, input_spec=TINY_SPEC, num_samples=8, progress=False)
    assert any("reusing the cached zeroq set" in r.getMessage() for r in caplog.records)
