"""Fault matrix, InputSpec against the model: one dry forward at the start, clear errors only."""
from __future__ import annotations

import pytest
import torch

import dfq_plugins
from dfq_plugins import InputSpec

from ..conftest import TINY_SPEC, TinyNet, make_tiny


def spec(**changes) -> InputSpec:
    d = TINY_SPEC.to_dict()
    d.update(changes)
    return InputSpec.from_dict(d)


@pytest.mark.parametrize("num_classes", [2, 10])
def test_num_classes_must_match_the_models_logits(num_classes):
    with pytest.raises(ValueError, match=f"gives 4 logits but InputSpec.num_classes is {num_classes}; "
                                         "set num_classes=4"):
        dfq_plugins.synthesize(make_tiny(), "intraq", input_spec=spec(num_classes=num_classes), num_samples=8,
                               progress=False)


@pytest.mark.parametrize("changes, message", [
    ({"pixel_range": (255, 0)}, "low < high"),
    ({"pixel_range": (0.5, 0.5)}, "low < high"),
    ({"num_classes": 0}, "at least 2 classes"),
])
def test_an_impossible_spec_is_refused_when_made(changes, message):
    with pytest.raises(ValueError, match=message):
        spec(**changes)


def test_a_channel_mismatch_is_named():
    one_channel = InputSpec(shape=(1, 16, 16), mean=(0.5,), std=(0.25,), num_classes=4)
    with pytest.raises(ValueError, match=r"does not take inputs of InputSpec.shape \(1, 16, 16\)"):
        dfq_plugins.quantize(make_tiny(), source="noise", input_spec=one_channel, num_samples=8, progress=False)


def test_a_meta_device_model_is_named():
    with torch.device("meta"):
        model = TinyNet(3)
    with pytest.raises(ValueError, match="meta device"):
        dfq_plugins.quantize(model, source="noise", input_spec=TINY_SPEC, num_samples=8, progress=False)


def test_a_float64_model_is_named():
    with pytest.raises(ValueError, match=r"call model.float\(\) first"):
        dfq_plugins.quantize(make_tiny().double(), source="noise", input_spec=TINY_SPEC, num_samples=8,
                             progress=False)


def test_wrong_argument_types_are_named():
    with pytest.raises(TypeError, match="input_spec must be an InputSpec"):
        dfq_plugins.synthesize(make_tiny(), "noise", input_spec=TINY_SPEC.to_dict(), num_samples=8)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        dfq_plugins.synthesize(object(), "noise", input_spec=TINY_SPEC, num_samples=8)
