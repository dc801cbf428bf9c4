"""Fault matrix, plugin names: a third-party plugin cannot hijack a built-in name."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dfq_plugins import hookimpl, plugins
from dfq_plugins.errors import PluginError

from ..test_plugins import ConstantSynth

HIJACKER = textwrap.dedent("""
    from dfq_plugins import hookimpl
    from dfq_plugins.synthesizers.simple import NoiseSynthesizer as GaussianNoise

    @hookimpl
    def dfq_register_synthesizers(register):
        register("zeroq", GaussianNoise)        # a built-in's name
        register("hijacker-noise", GaussianNoise)  # its own
""")


def install_hijacker(site: Path, ep_name: str = "zzz-hijack") -> dict[str, str]:
    """A distribution whose entry point sorts after builtin-sources and registers 'zeroq'."""
    (site / "hijack_dfq").mkdir(parents=True)
    (site / "hijack_dfq" / "__init__.py").write_text(HIJACKER)
    info = site / "hijack_dfq-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hijack-dfq\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[dfq_plugins]\n{ep_name} = hijack_dfq\n")
    return dict(os.environ, PYTHONPATH=str(site) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, check=False,
                          timeout=180)


def test_an_installed_plugin_claiming_zeroq_is_refused_and_the_builtins_stay(tmp_path):
    env = install_hijacker(tmp_path / "site")
    out = run_python("""
        import json, warnings
        from dfq_plugins import plugins
        from dfq_plugins.cli import main
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            entry = plugins.get("synthesizers", "zeroq")
        print(json.dumps({"zeroq": entry.plugin, "names": plugins.names("synthesizers"),
                          "warned": [str(w.message) for w in caught]}))
        main(["plugins"])
    """, env)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[0])
    assert got["zeroq"] == "builtin-sources"
    assert {"intraq", "hast", "genie", "dynadfq", "diffdfq", "hijacker-noise"} <= set(got["names"])
    assert any("zzz-hijack" in w and "refused" in w for w in got["warned"])
    assert "REFUSED synthesizer 'zeroq'" in out.stderr and "zzz-hijack" in out.stderr


def test_a_plugin_named_like_a_builtin_does_not_rank_as_one(tmp_path):
    """'builtin-aaa' from another distribution sorts first by name but is not dfq-plugins' own."""
    env = install_hijacker(tmp_path / "site", ep_name="builtin-aaa")
    out = run_python("""
        from dfq_plugins import plugins
        print(plugins.get("synthesizers", "zeroq").plugin)
    """, env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "builtin-sources"


def test_an_explicit_override_hands_the_name_over_loudly(tmp_path):
    env = install_hijacker(tmp_path / "site")
    env["DFQ_PLUGIN_OVERRIDES"] = "synthesizers:zeroq=zzz-hijack"
    out = run_python("""
        import warnings
        from dfq_plugins import plugins
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            print(plugins.get("synthesizers", "zeroq").plugin)
        print(any("overridden" in str(w.message) for w in caught))
    """, env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["zzz-hijack", "True"]


def test_an_in_process_plugin_cannot_take_a_builtin_name_and_keeps_its_others():
    class Squatter:
        @hookimpl
        def dfq_register_synthesizers(self, register):
            register("zeroq", ConstantSynth)
            register("constant", ConstantSynth)

    plugins.register_plugin(Squatter(), name="squatter")
    try:
        with pytest.warns(UserWarning, match="'squatter' also claims it and was refused"):
            assert plugins.get("synthesizers", "zeroq").plugin == "builtin-sources"
        assert plugins.get("synthesizers", "constant").plugin == "squatter"
        assert [(c.name, c.kept, c.refused) for c in plugins.conflicts()] == [("zeroq", "builtin-sources",
                                                                              "squatter")]
    finally:
        plugins.unregister_plugin("squatter")
    assert plugins.conflicts() == []


@pytest.mark.parametrize("value", ["zeroq", "zeroq=", "nosuchkind:zeroq=x"])
def test_a_malformed_override_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("DFQ_PLUGIN_OVERRIDES", value)
    with pytest.raises(PluginError, match="DFQ_PLUGIN_OVERRIDES"):
        plugins.collect("synthesizers")


def test_a_plugin_whose_hook_raises_contributes_nothing():
    """The defect: a synthesizer registered before the hook raised stayed registered beside the FAILED line."""
    from dfq_plugins.errors import UnknownNameError

    class HalfDone:
        @hookimpl
        def dfq_register_synthesizers(self, register):
            register("half-made", ConstantSynth)
            raise RuntimeError("the rest of this plugin failed")

    plugins.register_plugin(HalfDone(), name="half-done")
    try:
        with pytest.raises(UnknownNameError, match="no synthesizer named 'half-made'"):
            plugins.get("synthesizers", "half-made")
        assert any(f.name == "half-done" and "the rest of this plugin failed" in f.error for f in plugins.failures)
        assert plugins.get("synthesizers", "zeroq").plugin == "builtin-sources"  # the others still load
    finally:
        plugins.unregister_plugin("half-done")
