"""Every error a user can cause reaches them as one ``dfq: error: ...`` line with exit code 2, in a
new process as they run it: no traceback unless ``--debug`` or ``DFQ_DEBUG=1`` asks for one."""
from __future__ import annotations

import pickle
from fractions import Fraction

import pytest

from tests.test_as_users_run import dfq_command, own_model, run, user  # noqa: F401 - user is a fixture

TINY = ["--images", "8", "--set", "zeroq.iterations=2", "--quiet"]


def crafted_assets(root):
    """An assets folder whose ResNet-20 weights file is a pickle that needs more than tensors to load."""
    (root / "cifar10").mkdir(parents=True)
    with open(root / "cifar10" / "resnet20-12fca82f.th", "wb") as f:
        pickle.dump({"state_dict": {}, "payload": Fraction(1, 3)}, f)
    return root


@pytest.mark.parametrize("case", ["cache-is-a-file", "cache-under-a-file", "crafted-weights", "missing-recipe",
                                  "unknown-model", "missing-artefact", "unknown-cache-entry", "factory-raises"])
def test_each_user_error_is_one_line_and_exit_code_2_in_a_new_process(user, case):
    env, cwd = user
    (cwd / "file").write_text("not a folder")
    argv = [*dfq_command(), "synthesize", *own_model(cwd), *TINY]
    expect = {"cache-is-a-file": "not a directory", "cache-under-a-file": "cannot write to the cache folder",
              "crafted-weights": "is not a plain weights file", "missing-recipe": "nowhere.toml not found",
              "unknown-model": "no-such-model", "missing-artefact": "does not exist",
              "unknown-cache-entry": "no cache entries match", "factory-raises": "raised RuntimeError at"}[case]
    if case == "cache-is-a-file":
        env["DFQ_CACHE"] = str(cwd / "file")
    elif case == "cache-under-a-file":
        env["DFQ_CACHE"] = str(cwd / "file" / "cache")
    elif case == "crafted-weights":
        env["DFQ_ASSETS"] = str(crafted_assets(cwd / "assets"))
        argv = [*dfq_command(), "quantize", "--model", "cifar10-resnet20", *TINY]
    elif case == "missing-recipe":
        argv = [*dfq_command(), "quantize", "--recipe", "nowhere.toml"]
    elif case == "unknown-model":
        argv = [*dfq_command(), "quantize", "--model", "no-such-model"]
    elif case == "missing-artefact":
        argv = [*dfq_command(), "run", "nowhere.pt2"]
    elif case == "factory-raises":  # torch.load of a CUDA checkpoint without map_location, on a CPU machine
        (cwd / "net.py").write_text((cwd / "net.py").read_text()
                                    + "\n\ndef broken():\n    raise RuntimeError('no CUDA here')\n")
        argv = [*dfq_command(), "synthesize", "--model", f"{cwd / 'net.py'}:broken", *own_model(cwd)[2:], *TINY]
    else:
        argv = [*dfq_command(), "cache", "show", "zzzz-nothing"]
    done = run(argv, env, cwd, expect=2)
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith(("W1", "Skipping"))]
    assert "Traceback" not in done.stderr, done.stderr
    assert lines and lines[-1].startswith("dfq: error: ") and expect.lower() in lines[-1].lower(), done.stderr
    assert "weights_only=False" not in done.stderr  # torch's advice to unpickle is never passed on
    if case == "factory-raises":  # the user's own line, not ours, is named
        assert "net.py:" in lines[-1] and "no CUDA here" in lines[-1], lines[-1]


def test_debug_asks_for_the_traceback(user):
    env, cwd = user
    env["DFQ_CACHE"] = str(cwd / "file")
    (cwd / "file").write_text("not a folder")
    done = run([*dfq_command(), "--debug", "synthesize", *own_model(cwd), *TINY], env, cwd, expect=1)
    assert "Traceback" in done.stderr and "CacheLocationError" in done.stderr
