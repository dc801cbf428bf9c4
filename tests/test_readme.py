"""Every Python block of the README, and of the API tour (docs/api.md), runs as written, in order,
in one namespace per file.

The blocks keep the budgets a user would run (256 images, 1000 steps); here they are cut down
(8 images, 2 synthesis iterations, 3 steps) by wrapping the library's own entry points, so the
test checks names, signatures and the flow between blocks, not accuracy. A block preceded by
``<!-- readme-test: skip ... -->`` is a skeleton and is not run.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import dfq_plugins
from dfq_plugins import api
from dfq_plugins.distillers.base import Distiller
from dfq_plugins.synthesizers.optimizing import OptimizingSynthesizer

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
API_TOUR = ROOT / "docs" / "api.md"
BLOCK = re.compile(r"(<!-- readme-test: skip[^>]*-->\n)?```python\n(.*?)```", re.DOTALL)


def python_blocks(path: Path = README) -> list[str]:
    return [m.group(2) for m in BLOCK.finditer(path.read_text()) if not m.group(1)]


def run_blocks(path: Path) -> dict:
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(python_blocks(path)):
        try:
            exec(compile(block, f"{path.name} python block {i + 1}", "exec"), namespace)  # noqa: S102 (our own docs)
        except Exception as exc:
            failure = f"{path.name} python block {i + 1} fails: {type(exc).__name__}: {exc}"
            raise AssertionError(f"{failure}\n{block}") from exc
    return namespace


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


def test_the_readme_and_the_api_tour_have_python_blocks_to_run():
    assert len(python_blocks(README)) >= 3 and "dfq_plugins.quantize(" in python_blocks(README)[0]
    assert len(python_blocks(API_TOUR)) >= 2 and "dfq_plugins.synthesize(" in python_blocks(API_TOUR)[0]


def test_every_readme_python_block_runs_as_written(small_budgets):
    namespace = run_blocks(README)
    x = torch.randn(4, 3, 32, 32)
    assert namespace["qmodel"](x).shape == (4, 10) and namespace["q4"](x).shape == (4, 10)


def test_every_api_tour_python_block_runs_as_written(small_budgets):
    namespace = run_blocks(API_TOUR)
    assert namespace["logits"].shape == (8, 10)
    assert namespace["int8_model"](namespace["calib"][0]).shape == (8, 10)
