"""Dynamic bit-widths: bit-FLOPs, routing through real toolchain variants, the selector, the CLI."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dfq_plugins import CalibrationSet, QuantScheme
from dfq_plugins.api import make_toolchain
from dfq_plugins.bench.dynamic import line_between
from dfq_plugins.dynamic import (
    BitSelector,
    CascadeRouter,
    DynamicQuantModel,
    EscalationRouter,
    OutputSelector,
    SelectorConfig,
    SelectorRouter,
    bit_flops,
    choice_fractions,
    entry_for,
    escalation_costs,
    layer_macs,
    oracle_choices,
    precision_recall,
    stem_of,
    train_selector,
)
from dfq_plugins.dynamic.build import build_variants, parse_bits, parse_steps

from .conftest import TINY_SPEC, make_trained_tiny
from .test_distillers import colour_images


def test_bit_flops_count_macs_times_bits_with_layer_overrides():
    model = make_trained_tiny()
    # conv1 3->8 at 16x16, conv2 8->16 stride 2 (8x8), fc 16->4
    assert layer_macs(model, TINY_SPEC.shape) == [("conv1", 8 * 256 * 27), ("conv2", 16 * 64 * 72), ("fc", 64)]
    total = 8 * 256 * 27 + 16 * 64 * 72 + 64
    assert bit_flops(model, TINY_SPEC.shape, "w4a4") == total * 16
    scheme = QuantScheme.from_dict({"name": "w4a4", "first_layer": {"weight_bits": 8, "act_bits": 8}})
    assert bit_flops(model, TINY_SPEC.shape, scheme) == 8 * 256 * 27 * 64 + (16 * 64 * 72 + 64) * 16
    assert bit_flops(model, TINY_SPEC.shape, None) == total * 32 * 32
    assert model.training is False


class BrightnessSelector(nn.Module):
    """Chooses the dear variant for bright images: a known routing to check the plumbing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = (x.mean((1, 2, 3)) > 0).float()
        return torch.stack([1 - bright, bright], 1)


def build_tiny_variants(toolchain: str = "torch-ao-fx"):
    model = make_trained_tiny()
    x, _ = colour_images(64, seed=1)
    cs = CalibrationSet(x, batch_size=16, manifest={"input_spec": TINY_SPEC.to_dict()})
    # NNCF: symmetric activations below 8 bits, nothing below 4
    template, low = ("w{b}a{b}-symact", 4) if toolchain == "nncf" else ("w{b}a{b}", 2)
    return build_variants(model, TINY_SPEC, make_toolchain(toolchain), cs, [low, 8], steps={low: 0, 8: 0},
                          template=template, progress=False)


@pytest.fixture(scope="module")
def variants():
    return build_tiny_variants()


@pytest.mark.parametrize("toolchain", ["torch-ao-fx", "torchao-pt2e", "nncf"])
@pytest.mark.parametrize("which", ["student", "deployed"])
def test_routing_sends_each_input_to_its_variant_in_order(toolchain, which):
    built = build_tiny_variants(toolchain)
    models = {v.label: getattr(v, which) for v in built}
    costs = {v.label: v.bit_flops for v in built}
    dyn = DynamicQuantModel(models, costs, SelectorRouter(BrightnessSelector(), cost=5.0))
    x, _ = colour_images(40, seed=3)
    x = x + torch.linspace(-1, 1, 40).view(-1, 1, 1, 1)  # a mix of dark and bright inputs
    with torch.no_grad():
        out = dyn(x)
        choices = dyn.last_routing.choices
        assert 0 < int(choices.sum()) < 40
        one_by_one = torch.cat([dyn.variants[int(c)](x[i:i + 1]) for i, c in enumerate(choices)])
    torch.testing.assert_close(out, one_by_one)
    assert dyn.labels[-1].startswith("w8a8")  # cheapest first
    expected = torch.tensor([costs[dyn.labels[int(c)]] + 5.0 for c in choices], dtype=torch.float64)
    torch.testing.assert_close(dyn.last_routing.cost, expected)
    # the two variants really differ, so routing matters
    assert not torch.allclose(dyn.variants[0](x), dyn.variants[1](x))


def test_cascade_runs_the_cheap_variant_first_and_pays_for_every_stage(variants):
    built = variants
    dyn = DynamicQuantModel({v.label: v.deployed for v in built}, {v.label: v.bit_flops for v in built},
                            CascadeRouter(float("inf")))
    x, _ = colour_images(32, seed=4)
    cheap, dear = built[0].bit_flops, built[1].bit_flops
    with torch.no_grad():
        torch.testing.assert_close(dyn(x), dyn.variants[0](x))
        assert dyn.last_routing.cost.eq(cheap).all()
        everyone = dyn.with_router(CascadeRouter(-1.0))
        torch.testing.assert_close(everyone(x), dyn.variants[1](x))
        assert everyone.last_routing.choices.eq(1).all() and everyone.last_routing.cost.eq(cheap + dear).all()


def test_oracle_picks_the_fewest_bits_that_agree_and_precision_recall():
    logits = torch.tensor([[[1.0, 0], [1, 0], [0, 1]],  # cheap: class 0, 0, 1
                           [[1, 0], [0, 1], [1, 0]],  # middle
                           [[0, 1], [0, 1], [1, 0]]])  # dear
    reference = torch.tensor([0, 1, 0])
    oracle = oracle_choices(logits, reference)
    assert oracle.tolist() == [0, 1, 1]
    assert oracle_choices(logits, torch.tensor([1, 0, 0])).tolist() == [2, 0, 1]  # none agree -> dearest
    pr = precision_recall(torch.tensor([0, 2, 1]), oracle, 3)
    assert pr["precision"] == [1.0, 1.0, 0.0] and pr["recall"] == [1.0, 0.5, None]
    assert pr["exact"] == pytest.approx(2 / 3) and pr["enough_bits"] == 1.0
    assert choice_fractions(torch.tensor([0, 2, 2, 2]), 3) == [0.25, 0.0, 0.75]


def synthetic_routing_task(n: int = 512):
    """Inputs whose brightness decides whether the cheap variant is wrong: a selector must learn it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.3 + torch.randn(n, 1, 1, 1, generator=g)
    hard = x.mean((1, 2, 3)) > 0
    teacher = torch.randn(n, 4, generator=g) * 3
    cheap = teacher.clone()
    cheap[hard] = cheap[hard].roll(1, dims=1)  # the cheap variant gets the hard half wrong
    return x, torch.stack([cheap, teacher.clone()]), teacher, hard


@pytest.mark.parametrize("surrogate", ["expected", "straight-through"])
def test_selector_learns_which_inputs_need_bits_within_its_budget(surrogate):
    x, variant_logits, teacher, hard = synthetic_routing_task()
    costs = torch.tensor([1.0, 4.0], dtype=torch.float64)
    torch.manual_seed(0)
    selector = BitSelector(3, 2)
    cfg = SelectorConfig(steps=300, batch_size=128, lr=1e-2, surrogate=surrogate)
    train_selector(selector, x, variant_logits, teacher, costs, target=2.5, config=cfg, progress=False)
    with torch.no_grad():
        choices = selector(x).argmax(1)
    avg = float(costs[choices].mean())
    assert avg <= 2.5 * 1.1, avg  # the budget holds (about half may go to the dear variant)
    dear = choices == 1
    assert float((dear == hard).float().mean()) > 0.85  # and it is the hard half that gets the bits
    # a tight budget sends fewer inputs up
    torch.manual_seed(0)
    tight = BitSelector(3, 2)
    train_selector(tight, x, variant_logits, teacher, costs, target=1.6, config=cfg, progress=False)
    with torch.no_grad():
        assert int(tight(x).argmax(1).sum()) < int(dear.sum())


def test_stem_selector_keeps_the_model_stem_frozen():
    model = make_trained_tiny()
    selector = BitSelector(3, 2, features="stem", stem=stem_of(model), resolution=8)
    before = {k: v.clone() for k, v in selector.body.state_dict().items()}
    x, variant_logits, teacher, _ = synthetic_routing_task(128)
    train_selector(selector, x, variant_logits, teacher, torch.tensor([1.0, 4.0]), target=2.0,
                   config=SelectorConfig(steps=20), progress=False)
    for k, v in selector.body.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert selector.body[0].weight.data_ptr() != model.conv1.weight.data_ptr()  # a copy, not the teacher's own
    assert bit_flops(selector, TINY_SPEC.shape, None, bits=(32, 32)) > 0
    with pytest.raises(ValueError, match="stem"):
        BitSelector(3, 2, features="stem")


def uncertain_cheap_task(n: int = 512):
    """The cheap variant is wrong exactly where it is unsure (flat logits): what its output shows."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(n, 10, generator=g) * 3
    unsure = torch.rand(n, generator=g) < 0.3
    cheap = teacher.clone()
    cheap[unsure] = cheap[unsure].roll(1, dims=1) * 0.05  # wrong and flat
    return torch.stack([cheap, teacher.clone(), teacher.clone()]), teacher, unsure


def test_output_selector_escalates_the_inputs_the_cheap_variant_is_unsure_of():
    variant_logits, teacher, unsure = uncertain_cheap_task()
    costs = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    effective = escalation_costs(costs)
    assert effective.tolist() == [1.0, 3.0, 5.0]  # the cheap variant always runs first
    escalated = {}
    for target in (1.6, 3.0):  # 1.6: just enough to escalate the unsure 29%
        torch.manual_seed(0)
        selector = OutputSelector(3)
        train_selector(selector, variant_logits[0], variant_logits, teacher, effective, target=target,
                       config=SelectorConfig(steps=1000, lr=1e-2), progress=False)
        with torch.no_grad():
            choices = selector(variant_logits[0]).argmax(1)
        escalated[target] = choices > 0
        if target == 1.6:
            assert (choices != 2).all()
        assert float(escalated[target][unsure].float().mean()) > 0.95  # every unsure input gets more bits
    tight = escalated[1.6]
    # under a tight budget it escalates only the unsure inputs, and only to the middle variant,
    # which is as good as the dearest and cheaper
    assert float(unsure[tight].float().mean()) > 0.95
    assert int(tight.sum()) < int(escalated[3.0].sum())
    with pytest.raises(ValueError, match="logits"):
        selector(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="OutputSelector"):
        BitSelector(3, 2, features="output")


def test_escalation_router_keeps_the_cheap_answer_or_runs_one_dearer_variant(variants):
    built = variants

    class EscalateBright(nn.Module):
        """Escalates every second input, whatever the logits say."""

        def forward(self, logits: torch.Tensor) -> torch.Tensor:
            up = (torch.arange(logits.shape[0]) % 2).float()
            return torch.stack([1 - up, up], 1)

    dyn = DynamicQuantModel({v.label: v.deployed for v in built}, {v.label: v.bit_flops for v in built},
                            EscalationRouter(EscalateBright(), cost=2.0))
    x, _ = colour_images(16, seed=5)
    cheap, dear = built[0].bit_flops, built[1].bit_flops
    with torch.no_grad():
        out = dyn(x)
        torch.testing.assert_close(out[0::2], dyn.variants[0](x[0::2]))
        torch.testing.assert_close(out[1::2], dyn.variants[1](x[1::2]))
    cost = dyn.last_routing.cost
    assert cost[0::2].eq(cheap + 2.0).all() and cost[1::2].eq(cheap + dear + 2.0).all()


class ConstantLogits(nn.Module):
    """A stand-in variant: logits ``value`` on every input, NaN on the inputs in ``broken``."""

    def __init__(self, value: float, broken: slice | None = None) -> None:
        super().__init__()
        self.value, self.broken = value, broken

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.full((x.shape[0], 4), self.value)
        out[:, 0] += x.flatten(1).mean(1)  # depends on the input, so misrouting shows
        if self.broken is not None:
            out[self.broken] = float("nan")
        return out


def test_escalation_starts_from_the_dearest_variant_the_budget_affords():
    costs = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    assert [entry_for(costs, t) for t in (0.5, 1.0, 1.9, 2.0, 3.9, 4.0, 8.0, 100.0)] == [0, 0, 0, 1, 1, 2, 2, 2]
    assert escalation_costs(costs, 1)[1:].tolist() == [2.0, 6.0, 10.0]

    class EscalateSecondHalf(nn.Module):
        def forward(self, logits: torch.Tensor) -> torch.Tensor:
            up = (torch.arange(logits.shape[0]) >= logits.shape[0] // 2).float()
            return torch.stack([1 - up, up, torch.zeros_like(up)], 1)  # keep, or the next one

    variants = {f"v{i}": ConstantLogits(float(i)) for i in range(4)}
    dyn = DynamicQuantModel(variants, dict(zip(variants, costs.tolist(), strict=True)),
                            EscalationRouter(EscalateSecondHalf(), entry=1))
    x = torch.rand(8, 3, 4, 4)
    with torch.no_grad():
        out = dyn(x)
    torch.testing.assert_close(out[:4], dyn.variants[1](x[:4]))  # kept: the entry variant's answer
    torch.testing.assert_close(out[4:], dyn.variants[2](x[4:]))  # escalated to the next dearer one
    assert dyn.last_routing.choices.tolist() == [1] * 4 + [2] * 4
    assert dyn.last_routing.cost.tolist() == [2.0] * 4 + [6.0] * 4  # the cheapest never ran
    with pytest.raises(ValueError, match="nothing to escalate"):
        dyn.with_router(EscalationRouter(EscalateSecondHalf(), entry=3))(x)
    with pytest.raises(ValueError, match="index of a variant"):
        EscalationRouter(EscalateSecondHalf(), entry=-1)


def test_escalation_never_keeps_a_nan_answer():
    """A cheap variant that overflows on some inputs: those go to the dearest variant, whatever the
    selector would have said about the (NaN) descriptor, and the routed output is finite."""
    variants = {"cheap": ConstantLogits(0.0, broken=slice(0, 3)), "mid": ConstantLogits(1.0),
                "dear": ConstantLogits(2.0)}
    selector = OutputSelector(3).eval()  # the cascade start: keeps the confident inputs
    dyn = DynamicQuantModel(variants, {"cheap": 1.0, "mid": 2.0, "dear": 4.0}, EscalationRouter(selector))
    x = torch.rand(8, 3, 4, 4)
    with torch.no_grad():
        out = dyn(x)
    assert torch.isfinite(out).all()
    assert dyn.last_routing.choices[:3].tolist() == [2, 2, 2]
    torch.testing.assert_close(out[:3], dyn.variants[2](x[:3]))


def test_bad_dynamic_settings_are_clear_errors():
    assert parse_bits("8,4,6,4") == [4, 6, 8]
    with pytest.raises(ValueError, match="at least two"):
        parse_bits("4")
    assert parse_steps("4:500,8:0", [4, 8], 0) == {4: 500, 8: 0}
    assert parse_steps(100, [4, 8], 0) == {4: 100, 8: 100}
    with pytest.raises(ValueError, match="no budget for bit-widths \\[6\\]"):
        parse_steps("4:500,8:0", [4, 6, 8], 0)
    with pytest.raises(ValueError, match="BITS:STEPS"):
        parse_steps("4=500", [4], 0)
    with pytest.raises(ValueError, match="surrogate"):
        SelectorConfig(surrogate="gumbel")
    with pytest.raises(ValueError, match="unknown selector options \\['stpes'\\]"):
        SelectorConfig.from_dict({"stpes": 10})
    from dfq_plugins.bench.dynamic import DynamicPlan
    with pytest.raises(ValueError, match="features='pixels'.*output"):
        DynamicPlan(features="pixels")
    fixed = [{"bit_flops": 1.0, "top1": 80.0}, {"bit_flops": 3.0, "top1": 90.0}]
    assert line_between(fixed, 2.0) == 85.0 and line_between(fixed, 4.0) is None


@pytest.mark.parametrize("features", ["image", "output"])
def test_cli_dynamic_writes_record_table_and_plot(resnet20, tmp_path, capsys, features):
    from dfq_plugins.cli import main

    out = tmp_path / "dyn.json"
    assert main(["dynamic", "--quiet", "--bits", "4,8", "--source", "noise", "--images", "32", "--steps", "4:3,8:0",
                 "--test-limit", "64", "--targets", "0.5", "--escalate", "0.3", "--copies", "2", "--features", features,
                 "--references", "noise", "--selector-set", "steps=20", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [f["label"] for f in record["fixed"]] == ["w4a4-wmse-ahist", "w8a8"]
    assert record["fixed"][0]["distill_steps"] == 3 and record["fixed"][1]["distill_steps"] == 0
    assert record["fixed"][0]["bit_flops"] * 4 == record["fixed"][1]["bit_flops"]
    row = record["selector"][0]
    assert sum(row["fractions_real"]) == pytest.approx(1.0)
    assert record["selector_bit_flops"] > 0 and row["avg_bit_flops"] >= record["fixed"][0]["bit_flops"]
    assert record["cascade"][0]["avg_bit_flops"] >= record["fixed"][0]["bit_flops"]
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert out.with_suffix(".md").read_text().startswith("| router |")
    assert "cascade" in capsys.readouterr().out
    if features == "output":  # every input pays for the cheap variant, escalated ones for the dear one too
        assert row["avg_bit_flops"] >= record["fixed"][0]["bit_flops"] + record["selector_bit_flops"]
        assert record["selector_bit_flops"] < record["fixed"][0]["bit_flops"] / 100
