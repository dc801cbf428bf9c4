"""Every Python block of the README runs as written, in order, in one namespace.

The blocks keep the budgets a user would run (256 images, 1000 steps); here they are cut down
(8 images, 2 synthesis iterations, 3 steps) by wrapping the library's own entry points, so the
test checks names, signatures and the flow between blocks, not accuracy. A block preceded by
``<!-- readme-test: skip ... -->`` is a skeleton and is not run.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import dfq_plugins
from dfq_plugins import api
from dfq_plugins.distillers.base import Distiller
from dfq_plugins.synthesizers.optimizing import OptimizingSynthesizer

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- readme-test: skip[^>]*-->\n)?```python\n(.*?)```", re.DOTALL)


def python_blocks() -> list[str]:
    return [m.group(2) for m in BLOCK.finditer(README.read_text()) if not m.group(1)]


@pytest.fixture
def small_budgets(monkeypatch):
    synthesize = api.synthesize

    def few_images(*args, **kwargs):
        kwargs["num_samples"] = min(kwargs.get("num_samples", 256), 8)
        return synthesize(*args, **kwargs)

    monkeypatch.setattr(api, "synthesize", few_images)
    monkeypatch.setattr(dfq_plugins, "synthesize", few_images)
    synth_init, distill_init = OptimizingSynthesizer.__post_init__, Distiller.__post_init__

    def few_iterations(self):
        self.iterations = min(self.iterations, 2)
        synth_init(self)

    def few_steps(self):
        self.steps = min(self.steps, 3)
        self.warmup_steps, self.observer_steps = min(self.warmup_steps, 1), min(self.observer_steps, 1)
        distill_init(self)

    monkeypatch.setattr(OptimizingSynthesizer, "__post_init__", few_iterations)
    monkeypatch.setattr(Distiller, "__post_init__", few_steps)


def test_the_readme_has_python_blocks_to_run():
    blocks = python_blocks()
    assert len(blocks) >= 2 and "dfq_plugins.quantize(" in blocks[0]


def test_every_readme_python_block_runs_as_written(small_budgets):
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)  # noqa: S102 (our own README)
        except Exception as exc:
            raise AssertionError(f"README python block {i + 1} fails: {type(exc).__name__}: {exc}\n{block}") from exc
    assert namespace["logits"].shape == (8, 10)
    assert namespace["int8_model"](namespace["calib"][0]).shape == (8, 10)
