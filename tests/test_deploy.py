"""Export and load without pickle: round trips per toolchain, the sidecar, tampering, pickles refused,
and NNCF on an OpenVINO model with data-free calibration."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import dfq_plugins as dfq
from dfq_plugins.cli import main
from dfq_plugins.deploy import ExportError, export, load, sidecar_path
from dfq_plugins.deploy.artifact import weights_only_loads
from dfq_plugins.errors import CorruptArtifactError, DFQError
from tests.conftest import TINY_SPEC, make_trained_tiny


@pytest.fixture(scope="module")
def calib():
    return dfq.synthesize(make_trained_tiny(), "noise", input_spec=TINY_SPEC, num_samples=16, batch_size=8,
                          progress=False, cache=False)


def quantized(toolchain: str, scheme: str, calib) -> nn.Module:
    return dfq.quantize(make_trained_tiny(), toolchain=toolchain, scheme=scheme, source=calib, input_spec=TINY_SPEC)


@pytest.mark.compat
@pytest.mark.parametrize("toolchain, scheme", [("torchao-pt2e", "w8a8"), ("torch-ao-fx", "w4a4")])
def test_pt2_round_trip_gives_the_same_logits(tmp_path, calib, toolchain, scheme):
    q = quantized(toolchain, scheme, calib)
    path = export(q, tmp_path / "q.pt2", record={"top1": 12.5})
    deployed = load(path)
    x = torch.randn(5, *TINY_SPEC.shape)
    with torch.no_grad():
        assert torch.equal(q(x), deployed(x))
    assert deployed(x[:1]).shape == (1, 4)  # the batch dimension stays dynamic, down to 1
    info = json.loads(sidecar_path(path).read_text())
    assert info["toolchain"] == toolchain and info["scheme"] == q._dfq_info["scheme"] and info["top1"] == 12.5
    assert info["source"] == "noise" and info["calibration_hash"] == calib.content_hash()[:16]
    assert {"torch", "dfq-plugins"} <= set(info["versions"]) and info["sha256"]["q.pt2"]


def test_pt2e_artefact_holds_int8_weights_only(tmp_path, calib):
    q = quantized("torchao-pt2e", "w8a8", calib)
    fp = export(make_trained_tiny(), tmp_path / "fp.pt2", format="pt2", input_spec=TINY_SPEC)
    int8 = export(q, tmp_path / "q.pt2")
    program = load(int8).module
    weights = [t for n, t in program.state_dict().items() if t.dim() == 4]
    assert weights and all(t.dtype == torch.int8 for t in weights)  # the float originals were dropped
    assert int8.stat().st_size < fp.stat().st_size + 40_000


def test_fx_int8_model_says_to_use_pt2e(tmp_path, calib):
    with pytest.raises(ExportError, match="torchao-pt2e"):
        export(quantized("torch-ao-fx", "w8a8", calib), tmp_path / "q.pt2")


def test_export_checks_format_and_suffix(tmp_path, calib):
    q = quantized("torchao-pt2e", "w8a8", calib)
    with pytest.raises(ExportError, match="'.pt2' file"):
        export(q, tmp_path / "q.pt")
    with pytest.raises(ExportError, match="format='onnx'"):
        export(q, tmp_path / "q.onnx", format="onnx")
    with pytest.raises(ExportError, match="input_spec"):
        export(make_trained_tiny(), tmp_path / "fp.pt2", format="pt2")


def test_a_tampered_artefact_is_refused_before_parsing(tmp_path, calib):
    path = export(quantized("torchao-pt2e", "w8a8", calib), tmp_path / "q.pt2")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match="sha256 does not match"):
        load(path)
    sidecar_path(path).unlink()
    with pytest.raises(CorruptArtifactError, match="no sidecar"):
        load(path)


def test_a_pickle_is_never_loaded_even_with_a_matching_sidecar(tmp_path, calib):
    path = export(quantized("torchao-pt2e", "w8a8", calib), tmp_path / "q.pt2")
    torch.save(make_trained_tiny().state_dict(), path)  # what --save used to write, under the artefact's name
    body = json.loads(sidecar_path(path).read_text())
    from dfq_plugins.deploy.sidecar import file_sha256

    body["sha256"]["q.pt2"] = file_sha256(path)  # a forged sidecar: the hash check alone would pass
    sidecar_path(path).write_text(json.dumps(body))
    with pytest.raises(CorruptArtifactError, match="pickle"):
        load(path)


def test_the_load_guard_refuses_a_full_unpickle(tmp_path):
    from fractions import Fraction

    torch.save({"a": torch.zeros(1)}, tmp_path / "t.pt")
    torch.save({"a": torch.zeros(1), "code": Fraction(1, 3)}, tmp_path / "obj.pt")  # needs a real unpickle
    with weights_only_loads():
        assert torch.load(tmp_path / "t.pt")["a"].shape == (1,)  # tensors load
        # torch < 2.10's torch.export.load asks for a full unpickle of plain tensors: loaded weights-only
        assert torch.load(tmp_path / "t.pt", weights_only=False)["a"].shape == (1,)
        with pytest.raises(CorruptArtifactError, match="never unpickles"):
            torch.load(tmp_path / "obj.pt", weights_only=False)
    assert torch.load is not None and torch.load.__name__ == "load"  # restored


def test_cli_export_then_run(tmp_path, capsys):
    from tests.test_own_model_cli import NET, SPEC

    (tmp_path / "net.py").write_text(NET)
    path = tmp_path / "q.pt2"
    assert main(["quantize", "--model", f"{tmp_path / 'net.py'}:build", *SPEC, "--source", "noise", "--images", "8",
                 "--toolchain", "torchao-pt2e", "--export", str(path), "--quiet"]) == 0
    assert f"exported {path}" in capsys.readouterr().out
    assert main(["run", str(path), "--latency", "--rounds", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "sha256 verified" in out and "no accuracy check" in out and "latency at batch 32" in out
    path.write_bytes(path.read_bytes()[:-10])
    assert main(["run", str(path)]) == 2
    assert "sha256 does not match" in capsys.readouterr().err


def test_cli_export_records_the_reloaded_artefacts_top1(tmp_path, capsys):
    from tests.test_own_model_cli import NET, SPEC, image_folder

    (tmp_path / "net.py").write_text(NET)
    images = image_folder(tmp_path / "images")
    path = tmp_path / "q.pt2"
    assert main(["quantize", "--model", f"{tmp_path / 'net.py'}:build", *SPEC, "--source", "noise", "--images", "8",
                 "--toolchain", "torchao-pt2e", "--export", str(path), "--test-dir", str(images), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "top-1 of the exported artefact, reloaded" in out
    info = json.loads(sidecar_path(path).read_text())
    assert info["top1_deployed"] == info["top1"]  # torch.export of the same graph: the same predictions
    assert load(path).info["top1_deployed"] == info["top1_deployed"]  # the rewritten sidecar still verifies


def test_export_to_a_read_only_disk_fails_clearly_and_keeps_a_previous_export(tmp_path, calib, monkeypatch):
    import errno

    from dfq_plugins import io

    q = quantized("torchao-pt2e", "w8a8", calib)
    good = export(q, tmp_path / "q.pt2")
    before = good.read_bytes()

    def read_only(*args, **kwargs):  # what mkstemp meets on a read-only mount (root ignores chmod)
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(io.tempfile, "mkstemp", read_only)
    with pytest.raises(ExportError, match="writable folder"):
        export(q, tmp_path / "new.pt2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.pt2", "q.pt2.json"]  # nothing half-written
    with pytest.raises(ExportError, match="Read-only"):
        export(q, good)  # over a previous export: it is kept, whole and verifiable
    assert good.read_bytes() == before and load(good).info["format"] == "pt2"


def test_save_is_gone_and_says_what_to_use(capsys):
    assert main(["quantize", "--save", "q.pt", "--source", "noise"]) == 2
    assert "--export PATH.pt2" in capsys.readouterr().err


# -- OpenVINO ------------------------------------------------------------------------------------
@pytest.mark.compat
def test_nncf_round_trip_through_openvino(tmp_path, calib):
    pytest.importorskip("openvino", reason="OpenVINO is the NNCF artefact's runtime: pip install openvino")
    q = quantized("nncf", "w8a8", calib)
    path = export(q, tmp_path / "q.xml")
    info = json.loads(sidecar_path(path).read_text())
    assert set(info["sha256"]) == {"q.xml", "q.bin"} and info["format"] == "openvino"
    deployed = load(path, threads=1)
    x = torch.randn(5, *TINY_SPEC.shape)
    with torch.no_grad():
        ref = q(x)
    assert deployed(x).shape == (5, 4) and deployed(x[:1]).shape == (1, 4)
    assert (deployed(x).argmax(1) == ref.argmax(1)).float().mean() >= 0.8
    assert load(path, threads=1, precision="f32").backend == "openvino f32"  # a true FP32 baseline, on request
    with pytest.raises(ValueError, match="precision"):
        load(path, precision="fp64")
    assert torch.allclose(deployed(x), ref, atol=0.15 * float(ref.abs().max()))
    path.with_suffix(".bin").write_bytes(b"\0" * 16)
    with pytest.raises(CorruptArtifactError, match="q.bin: sha256"):
        load(path)


class ChannelsLast(nn.Module):
    """A network whose graph takes NHWC images (as many converted TF models do)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_trained_tiny()

    def forward(self, x):
        return self.net(x.permute(0, 3, 1, 2))


def test_openvino_model_quantized_data_free_lines_up_with_its_layout():
    ov = pytest.importorskip("openvino", reason="needs OpenVINO")
    import dfq_nncf
    from dfq_nncf.openvino import ir_layout

    torch_model = make_trained_tiny()
    nchw = ov.convert_model(torch_model, example_input=torch.randn(2, *TINY_SPEC.shape))
    nhwc = ov.convert_model(ChannelsLast(), example_input=torch.randn(2, 16, 16, 3))
    nhwc.reshape({nhwc.inputs[0]: ov.PartialShape([-1, 16, 16, 3])})
    assert ir_layout(nchw, TINY_SPEC) == "NCHW" and ir_layout(nhwc, TINY_SPEC) == "NHWC"
    wrong = ov.convert_model(make_trained_tiny(), example_input=torch.randn(2, 3, 20, 20))
    wrong.reshape({wrong.inputs[0]: ov.PartialShape([-1, 3, 20, 20])})
    with pytest.raises(DFQError, match="matches neither"):
        ir_layout(wrong, TINY_SPEC)
    q = dfq_nncf.quantize_openvino(nchw, torch_model, source={"name": "zeroq", "iterations": 3},
                                   input_spec=TINY_SPEC, num_samples=16, progress=False)
    assert sum(op.get_type_name() == "FakeQuantize" for op in q.get_ops()) >= 3
    x = torch.randn(6, *TINY_SPEC.shape)
    out = torch.from_numpy(ov.Core().compile_model(q, "CPU")(x.numpy())[0])
    with torch.no_grad():
        assert (out.argmax(1) == torch_model(x).argmax(1)).float().mean() >= 0.8
    ds = dfq_nncf.calibration_dataset_openvino(nhwc, torch_model, "noise", input_spec=TINY_SPEC, num_samples=8)
    first = next(iter(ds.get_inference_data()))
    assert first.shape[1:] == (16, 16, 3)  # channels last, as the IR takes them


def test_cpu_summary_names_the_cpu_and_its_int8_flags():
    from dfq_plugins.bench.machine import cpu_summary

    avx2 = cpu_summary("model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma\n")
    amx = cpu_summary("model name\t: Intel Xeon\nflags\t\t: avx2 avx512f avx512_vnni avx512_bf16 amx_tile amx_int8\n")
    assert avx2["cpu"] == "AMD EPYC" and avx2["isa"] == ["avx2"]
    assert amx["isa"] == ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"]
    assert cpu_summary("")["cpu"]  # no /proc/cpuinfo (not Linux): still a name


def test_deploy_bench_refuses_to_resume_a_record_of_another_setup(tmp_path, resnet20):
    """Rows and artefacts of another calibration budget (or CPU, or options) must not be mixed in."""
    from dfq_plugins.bench.deploy import DeployPlan, run_deploy_bench

    record = tmp_path / "d.json"
    old = {"setup": {"model": "cifar10-resnet20", "images": 64}, "rows": [{"source": "zeroq"}], "fp_top1": 91.6}
    record.write_text(json.dumps(old))
    with pytest.raises(DFQError, match="another .*images.*new --json"):
        run_deploy_bench(DeployPlan(model="cifar10-resnet20", images=256), record, log=lambda _: None)
    assert json.loads(record.read_text()) == old  # the earlier record is left as it was


class BatchBounded(nn.Module):
    """A model whose trace bounds the batch, as BatchNorm on CUDA does on torch 2.11 (batch <= 65535):
    a Dim('batch', min=1) made export fail with 'Constraints violated (batch)'."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_trained_tiny()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(0) > 65535:
            raise RuntimeError("batch too large for this kernel")
        return self.net(x)


@pytest.mark.compat
def test_a_batch_bound_from_tracing_does_not_stop_pt2e_or_its_export(tmp_path, calib):
    q = dfq.quantize(BatchBounded().eval(), toolchain="torchao-pt2e", scheme="w8a8", source=calib,
                     input_spec=TINY_SPEC)
    deployed = load(export(q, tmp_path / "q.pt2"))
    for batch in (1, 5):
        assert deployed(torch.randn(batch, *TINY_SPEC.shape)).shape == (batch, 4)
