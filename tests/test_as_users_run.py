"""The README's commands as a user runs them: each in a new interpreter (the installed ``dfq``),
with a fresh DFQ_CACHE, so nothing a test process already imported can hide a missing import.

Budgets are tiny (a 16x16 model of the user's own, a few images and iterations); what is under
test is that each command works in a process of its own, not the accuracy it reaches."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.test_own_model_cli import NET, SPEC

pytestmark = pytest.mark.compat

TINY = ["--images", "8", "--batch-size", "8", "--set", "zeroq.iterations=3"]


def dfq_command() -> list[str]:
    """The installed console script beside this interpreter, else the module (an uninstalled checkout)."""
    script = Path(sys.executable).with_name("dfq")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dfq_plugins.cli"]


def run(args: list[str], env: dict[str, str], cwd: Path, *, expect: int = 0, timeout: int = 600
        ) -> subprocess.CompletedProcess[str]:
    """One command in a new process; fails the test with its output when the exit code differs."""
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == expect, (f"{' '.join(args)} exited {done.returncode}, expected {expect}\n"
                                       f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")
    return done


@pytest.fixture
def user(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A user's environment: a fresh cache, a working folder, their own model file."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST", "DFQ_CACHE", "TORCHAO_FORCE_SKIP"))}  # conftest sets it; users do not
    env["DFQ_CACHE"] = str(tmp_path / "cache")
    env.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
    (tmp_path / "net.py").write_text(NET)
    return env, tmp_path


def own_model(cwd: Path) -> list[str]:
    return ["--model", f"{cwd / 'net.py'}:build", *SPEC]


LOAD_IN_PYTHON = textwrap.dedent("""
    import sys, torch
    from dfq_plugins import load_exported
    deployed = load_exported(sys.argv[1])
    logits = deployed(deployed.input_spec.example(3, 'cpu').normal_())
    assert logits.shape == (3, 5) and torch.isfinite(logits).all(), logits
    print('loaded', deployed.backend, tuple(logits.shape))
""")


@pytest.mark.parametrize("toolchain, scheme, artefact", [
    ("torchao-pt2e", "w8a8", "m.pt2"),
    ("torch-ao-fx", "w4a4", "m.pt2"),
    ("nncf", "w8a8", "m.xml"),
])
def test_export_then_run_and_load_each_in_a_new_process(user, toolchain, scheme, artefact):
    env, cwd = user
    run([*dfq_command(), "quantize", *own_model(cwd), "--toolchain", toolchain, "--scheme", scheme, *TINY,
         "--export", artefact, "--quiet"], env, cwd)
    checked = run([*dfq_command(), "run", artefact], env, cwd)
    assert "sha256 verified" in checked.stdout
    assert "Failed to load" not in checked.stdout + checked.stderr  # torchao's CUDA-kernel probing, on a CPU
    assert "Enum subclass" not in checked.stdout + checked.stderr  # torch's notice about torchao's own code
    assert "Skipping import" not in checked.stdout + checked.stderr  # torchao's, about the setting dfq made
    assert "loaded" in run([sys.executable, "-c", LOAD_IN_PYTHON, artefact], env, cwd).stdout


def test_a_missing_toolchain_package_is_named_when_loading(user):
    """An artefact whose toolchain package is not importable: one clear line naming what to install."""
    env, cwd = user
    run([*dfq_command(), "quantize", *own_model(cwd), "--toolchain", "torchao-pt2e", *TINY, "--export", "m.pt2",
         "--quiet"], env, cwd)
    blocker = cwd / "blocked"
    (blocker / "torchao").mkdir(parents=True)
    (blocker / "torchao" / "__init__.py").write_text("raise ImportError('torchao is not installed here')\n")
    env = {**env, "PYTHONPATH": os.pathsep.join([str(blocker), env.get("PYTHONPATH", "")])}
    done = run([*dfq_command(), "run", "m.pt2"], env, cwd, expect=2)
    assert "pip install torchao" in done.stderr and "Traceback" not in done.stderr


def test_quantize_with_the_defaults(user):
    env, cwd = user
    done = run([*dfq_command(), "quantize", "--images", "16", "--set", "zeroq.iterations=2"], env, cwd)
    out = done.stdout
    if "no accuracy check" in out:  # the assets are absent: the fallback model ran instead
        assert "efficientnet-lite0" in out
    else:
        assert "cifar10-resnet20" in out and "torch-ao-fx" in out and "top-1 on cifar10-test932" in out


def test_a_saved_set_feeds_a_later_quantize(user):
    env, cwd = user
    run([*dfq_command(), "synthesize", *own_model(cwd), *TINY, "--out", "set.safetensors", "--quiet"], env, cwd)
    done = run([*dfq_command(), "quantize", *own_model(cwd), "--source", "set.safetensors", "--quiet"], env, cwd)
    assert "8 images from" in done.stdout


def test_bench_resumes_its_json_and_the_cache_lists_the_set(user, resnet20):
    env, cwd = user
    bench = [*dfq_command(), "bench", "--model", "cifar10-resnet20", "--toolchain", "torch-ao-fx", "--scheme", "w8a8",
             "--source", "zeroq", "--set", "zeroq.iterations=2", "--images", "16", "--test-limit", "100",
             "--json", "b.json"]
    run(bench, env, cwd)
    first = json.loads((cwd / "b.json").read_text())
    done = run(bench, env, cwd)
    assert json.loads((cwd / "b.json").read_text()) == first and "already in" in done.stdout + done.stderr
    listing = run([*dfq_command(), "cache", "list"], env, cwd).stdout
    assert "zeroq" in listing
