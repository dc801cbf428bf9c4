"""Plugin discovery, temporary registration, typo detection, broken and third-party plugins."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch

import dfq_plugins
from dfq_plugins import hookimpl, plugins
from dfq_plugins.errors import UnknownNameError
from dfq_plugins.synthesizers.base import Synthesizer


def test_builtins_arrive_through_entry_points():
    rows = {r["plugin"]: r for r in plugins.describe()}
    assert rows["builtin-sources"]["distribution"] == "dfq-plugins"
    assert {"noise", "real", "zeroq"} <= set(rows["builtin-sources"]["registers"]["synthesizers"])
    assert rows["torch-ao"]["registers"]["toolchains"] == ["torch-ao-fx", "torchao-pt2e"]
    assert rows["nncf"]["distribution"] == "dfq-nncf"
    assert "cifar10-resnet20" in plugins.names("models")


@dataclass
class ConstantSynth(Synthesizer):
    name = "constant"
    value: float = 0.5

    def synthesize(self, teacher, num_samples, *, seed=0, batch_size=32, progress=True, workdir=None):
        return self.finish(teacher, torch.full((num_samples, *teacher.spec.shape), self.value), seed, batch_size)


class TempPlugin:
    __name__ = "temp-plugin"

    @hookimpl
    def dfq_register_synthesizers(self, register):
        register("constant", ConstantSynth)


@pytest.fixture
def temp_plugin():
    plugins.register_plugin(TempPlugin(), name="temp-plugin")
    try:
        yield
    finally:
        plugins.unregister_plugin("temp-plugin")


def test_temporary_plugin_is_usable_then_gone(temp_plugin, tiny):
    model, spec = tiny
    cs = dfq_plugins.synthesize(model, {"name": "constant", "value": 0.25}, input_spec=spec, num_samples=8,
                                progress=False)
    assert torch.all(cs.images == 0.25)
    assert plugins.get("synthesizers", "constant").plugin == "temp-plugin"
    plugins.unregister_plugin("temp-plugin")
    with pytest.raises(UnknownNameError, match="no synthesizer named 'constant'"):
        plugins.get("synthesizers", "constant")
    plugins.register_plugin(TempPlugin(), name="temp-plugin")  # fixture teardown unregisters


def test_misspelled_hook_is_rejected_with_a_suggestion():
    class Typo:
        @hookimpl
        def dfq_register_synthesiser(self, register):  # British spelling, singular
            pass

    with pytest.raises(Exception, match="dfq_register_synthesizers"):
        plugins.register_plugin(Typo(), name="typo")
    assert not plugins.pm.has_plugin("typo")


def test_duplicate_names_from_two_plugins_keep_the_first(temp_plugin):
    class Dup:
        @hookimpl
        def dfq_register_synthesizers(self, register):
            register("constant", ConstantSynth)

    plugins.register_plugin(Dup(), name="dup")
    try:
        assert plugins.collect("synthesizers")["constant"].plugin == "temp-plugin"
        assert any(c.refused == "dup" for c in plugins.conflicts())
    finally:
        plugins.unregister_plugin("dup")


def test_unknown_name_suggests_the_close_one():
    with pytest.raises(UnknownNameError, match="Did you mean 'zeroq'"):
        plugins.get("synthesizers", "zeroqq")


def test_example_third_party_plugin_is_installed_and_works(tiny):
    entry = plugins.get("synthesizers", "smooth-noise")
    assert entry.distribution == "dfq-example-plugin"
    model, spec = tiny
    q = dfq_plugins.quantize(model, toolchain="torch-ao-fx", source="smooth-noise", input_spec=spec,
                             num_samples=32, progress=False)
    x = torch.randn(4, *spec.shape)
    assert q(x).shape == (4, 4)


def test_broken_entry_point_is_reported_and_the_rest_still_load(tmp_path):
    """Installs a distribution whose plugin module raises on import, then runs `dfq plugins`."""
    site = tmp_path / "site"
    (site / "broken_dfq_plugin").mkdir(parents=True)
    (site / "broken_dfq_plugin" / "__init__.py").write_text("raise ImportError('this plugin is broken')\n")
    info = site / "broken_dfq_plugin-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-dfq-plugin\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[dfq_plugins]\nbroken = broken_dfq_plugin\n")
    env = dict(os.environ, PYTHONPATH=str(site) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = textwrap.dedent("""
        import sys
        from dfq_plugins.cli import main
        sys.exit(main(["plugins", "--json"]))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    failed = {f["name"]: f for f in report["failures"]}
    assert failed["broken"]["distribution"] == "broken-dfq-plugin"
    assert "this plugin is broken" in failed["broken"]["error"]
    loaded = {r["plugin"] for r in report["plugins"]}
    assert {"builtin-sources", "torch-ao", "nncf", "example"} <= loaded
