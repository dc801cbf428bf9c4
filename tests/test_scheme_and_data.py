"""QuantScheme parsing and CalibrationSet batching, views, persistence and integrity."""
from __future__ import annotations

import json

import pytest
import torch

from dfq_plugins import CalibrationSet, QuantScheme
from dfq_plugins.errors import CorruptArtifactError
from dfq_plugins.scheme import LayerBits


def test_scheme_names_and_ranges():
    s = QuantScheme.parse("w4a8")
    assert (s.weight_bits, s.act_bits, s.weight_per_channel, s.weight_symmetric, s.act_symmetric) == (
        4, 8, True, True, False)
    assert s.weight_range() == (-8, 7) and s.act_range() == (0, 255) and s.act_range(4) == (0, 15)
    assert QuantScheme.parse("w4a4-symact").act_range() == (-8, 7)
    d = QuantScheme.parse({"name": "w4a4", "first_layer": {"weight_bits": 8, "act_bits": 8}})
    assert d.first_layer == LayerBits(8, 8) and d.name == "w4a4-ahist-bcbn-first88"
    assert QuantScheme.from_dict(d.to_dict()) == d


@pytest.mark.parametrize("bad", ["w16a8", "int8", "w4"])
def test_bad_scheme_names_say_what_is_accepted(bad):
    with pytest.raises(ValueError, match="w8a8|2 to 8 bits"):
        QuantScheme.parse(bad)


def test_batches_cover_every_sample_once():
    x = torch.arange(10.0).view(10, 1, 1, 1)
    cs = CalibrationSet(x, batch_size=4, labels=torch.arange(10))
    assert len(cs) == 3 and [b.shape[0] for b in cs] == [4, 4, 2]
    assert torch.equal(torch.cat(list(cs)), x)
    assert torch.equal(cs[-1], x[8:])
    with pytest.raises(IndexError):
        cs[3]
    assert [lab.tolist() for _, lab, _ in cs.labelled_batches()][-1] == [8, 9]


def test_tuple_and_dict_inputs_round_trip(tmp_path):
    a, b = torch.randn(5, 3), torch.randn(5, 2)
    for inputs in ((a, b), {"a": a, "b": b}):
        cs = CalibrationSet(inputs, batch_size=2)
        loaded = CalibrationSet.load(cs.save(tmp_path / "set"))
        first = loaded[0]
        if isinstance(inputs, tuple):
            assert isinstance(first, tuple) and torch.equal(first[1], b[:2])
        else:
            assert torch.equal(first["b"], b[:2])


def test_save_load_keeps_everything_and_detects_tampering(tmp_path):
    cs = CalibrationSet(torch.randn(6, 3, 4, 4), 4, labels=torch.arange(6), soft_labels=torch.rand(6, 3),
                        metadata={"difficulty": torch.rand(6)}, manifest={"method": "x", "seed": 3})
    path = cs.save(tmp_path / "calib.safetensors")
    assert json.loads(path.with_suffix(".json").read_text())["manifest"]["seed"] == 3
    back = CalibrationSet.load(path)
    assert torch.equal(back.images, cs.images) and torch.equal(back.metadata["difficulty"], cs.metadata["difficulty"])
    assert back.content_hash() == cs.content_hash() and back.manifest == cs.manifest
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip bits inside the tensor data
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptArtifactError, match="hash mismatch"):
        CalibrationSet.load(path)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(CorruptArtifactError, match="synthesize again"):
        CalibrationSet.load(path)


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = CalibrationSet(torch.zeros(2, 1), 1).save(tmp_path / "set.safetensors")
    before = path.read_bytes()
    import dfq_plugins.data as data_mod

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(data_mod, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        CalibrationSet(torch.ones(2, 1), 1).save(path)
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_nncf_view_is_reiterable_and_sized():
    cs = CalibrationSet(torch.randn(10, 3), batch_size=4)
    ds = cs.as_nncf()
    first = list(ds.get_inference_data())
    second = list(ds.get_inference_data())
    assert len(first) == len(second) == 3 and ds.get_length() == 3 and ds.get_batch_size() == 4
    loader = cs.as_dataloader()
    assert [b.shape[0] for b in loader] == [4, 4, 2]


def test_saved_files_get_ordinary_permissions(tmp_path):
    import os
    import stat

    path = CalibrationSet(torch.zeros(2, 1), 1).save(tmp_path / "perm.safetensors")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
