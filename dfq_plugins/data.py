"""CalibrationSet: the one object every toolchain and distiller consumes.

A sized, re-iterable, map-style collection of ready batches (a tensor, a tuple for
multi-input models, a dict for keyword inputs) with hard labels, soft labels, per-sample
metadata and a manifest. Saved as one safetensors file (manifest and content hash in its
header; no pickle, so a shared set cannot run code) plus a human-readable JSON copy.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from safetensors.torch import load_file, safe_open, save_file

from .errors import CorruptArtifactError, NonFiniteError
from .io import atomic_write, atomic_write_text, tensors_hash

Batch = Union[torch.Tensor, tuple, dict]
FORMAT_VERSION = 1
_MANIFEST_KEY = "dfq_manifest"
_HEADER_FIELDS = ("format_version", "input_kind", "batch_size", "num_samples", "content_hash", "manifest")


def header_hash(header: dict[str, Any]) -> str:
    """sha256 of everything in a saved set's header but itself, so an edited manifest (its
    ``input_spec`` drives ``input_range="spec"``) is refused like edited pixels are."""
    import hashlib

    text = json.dumps({k: header.get(k) for k in _HEADER_FIELDS}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _flatten_inputs(inputs: Batch) -> tuple[str, dict[str, torch.Tensor]]:
    if isinstance(inputs, torch.Tensor):
        return "tensor", {"x": inputs}
    if isinstance(inputs, tuple):
        return "tuple", {f"args.{i}": t for i, t in enumerate(inputs)}
    if isinstance(inputs, dict):
        return "dict", {f"kwargs.{k}": t for k, t in inputs.items()}
    raise TypeError(f"calibration inputs must be a tensor, tuple or dict of tensors, got {type(inputs).__name__}")


@dataclass
class CalibrationSet:
    """Samples with leading dimension N, served as batches of ``batch_size``."""

    inputs: Batch
    batch_size: int = 32
    labels: torch.Tensor | None = None
    soft_labels: torch.Tensor | None = None
    metadata: dict[str, torch.Tensor] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._kind, self._tensors = _flatten_inputs(self.inputs)
        sizes = {t.shape[0] for t in self._tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f"all input tensors need the same number of samples, got {sorted(sizes)}")
        (self.num_samples,) = sizes
        if self.num_samples == 0:
            raise ValueError("a CalibrationSet needs at least one sample")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool):
            raise TypeError(f"batch_size must be an int, got {type(self.batch_size).__name__} "
                            "(CalibrationSet(images, batch_size=32, labels=...): the second argument is the batch size)")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        for name, t in [("labels", self.labels), ("soft_labels", self.soft_labels), *self.metadata.items()]:
            if t is not None and t.shape[0] != self.num_samples:
                raise ValueError(f"{name} has {t.shape[0]} rows for {self.num_samples} samples")

    # --- map-style access -------------------------------------------------------------
    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def _slice(self, i: int) -> slice:
        if not -len(self) <= i < len(self):
            raise IndexError(f"batch {i} out of range for {len(self)} batches")
        i %= len(self)
        return slice(i * self.batch_size, (i + 1) * self.batch_size)

    def __getitem__(self, i: int) -> Batch:
        s = self._slice(i)
        if self._kind == "tensor":
            return self._tensors["x"][s]
        if self._kind == "tuple":
            return tuple(self._tensors[f"args.{k}"][s] for k in range(len(self._tensors)))
        return {k.removeprefix("kwargs."): t[s] for k, t in self._tensors.items()}

    def __iter__(self) -> Iterator[Batch]:
        for i in range(len(self)):
            yield self[i]

    def labelled_batches(self) -> Iterator[tuple[Batch, torch.Tensor | None, torch.Tensor | None]]:
        """(inputs, hard labels, soft labels) per batch, for distillers."""
        for i in range(len(self)):
            s = self._slice(i)
            yield (
                self[i],
                None if self.labels is None else self.labels[s],
                None if self.soft_labels is None else self.soft_labels[s],
            )

    def with_batch_size(self, batch_size: int) -> CalibrationSet:
        return CalibrationSet(self.inputs, batch_size, self.labels, self.soft_labels, dict(self.metadata),
                              dict(self.manifest))

    # --- views for each consumer ------------------------------------------------------
    def as_dataloader(self) -> torch.utils.data.DataLoader:
        """A DataLoader that yields the same ready batches (batching already done)."""
        return torch.utils.data.DataLoader(_BatchView(self), batch_size=None, shuffle=False)

    def as_nncf(self, device: torch.device | str | None = None) -> Any:
        """An ``nncf.Dataset`` over this set: re-iterable (NNCF reads the first item twice);
        ``device``: where the model is, so each batch is moved there as NNCF reads it."""
        import nncf

        if device is None or torch.device(device).type == "cpu":
            return nncf.Dataset(_BatchView(self))
        from .device import to_device

        target = torch.device(device)
        return nncf.Dataset(_BatchView(self), lambda batch: to_device(batch, target))

    def as_mct(self) -> Any:
        """MCT's representative_data_gen: a callable returning an iterator of input lists."""
        return lambda: ([b] if isinstance(b, torch.Tensor) else list(b) for b in self)

    # --- persistence ------------------------------------------------------------------
    def _all_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"inputs.{k}": t.contiguous() for k, t in self._tensors.items()}
        if self.labels is not None:
            out["labels"] = self.labels.contiguous()
        if self.soft_labels is not None:
            out["soft_labels"] = self.soft_labels.contiguous()
        out.update({f"meta.{k}": t.contiguous() for k, t in self.metadata.items()})
        return out

    def content_hash(self) -> str:
        return tensors_hash(self._all_tensors())

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.safetensors) atomically, plus a ``.json`` copy of the manifest."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        tensors = self._all_tensors()
        bad = _non_finite(tensors)
        if bad:
            raise NonFiniteError(f"refusing to save a calibration set with NaN or infinite values in {bad}; "
                                 "it would calibrate a model with NaN ranges")
        header = {
            "format_version": FORMAT_VERSION,
            "input_kind": self._kind,
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
            "content_hash": tensors_hash(tensors),
            "manifest": json.loads(json.dumps(self.manifest, default=str)),  # as it will read back
        }
        header["header_hash"] = header_hash(header)
        text = json.dumps(header, sort_keys=True, default=str)
        atomic_write(path, lambda p: save_file(tensors, str(p), metadata={_MANIFEST_KEY: text}))
        atomic_write_text(path.with_suffix(".json"), json.dumps(header, indent=2, sort_keys=True, default=str))
        return path

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True) -> CalibrationSet:
        """Read a saved set; with ``verify`` the content hash must match or we refuse it."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no calibration set at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {})[_MANIFEST_KEY])
            tensors = load_file(str(path))
        except Exception as exc:
            raise CorruptArtifactError(
                f"{path} is not a readable dfq calibration set ({type(exc).__name__}: {exc}); delete it and "
                "synthesize again"
            ) from exc
        if header.get("format_version") != FORMAT_VERSION:
            raise CorruptArtifactError(f"{path}: unsupported format_version {header.get('format_version')}")
        if verify and tensors_hash(tensors) != header["content_hash"]:
            raise CorruptArtifactError(
                f"{path}: content hash mismatch, the file was modified or damaged; delete it and synthesize again"
            )
        if verify and "header_hash" in header and header_hash(header) != header["header_hash"]:
            raise CorruptArtifactError(
                f"{path}: header hash mismatch, its manifest was edited or damaged; delete it and synthesize again"
            )
        if verify and "header_hash" not in header:
            warnings.warn(f"{path} was written by an older dfq-plugins: its pixels are verified, its manifest is "
                          "not; re-save it (CalibrationSet.load(p).save(p)) to cover both", stacklevel=2)
        bad = _non_finite(tensors)
        if bad:
            raise CorruptArtifactError(f"{path}: NaN or infinite values in {bad}; delete it and synthesize again")
        kind = header["input_kind"]
        ins = {k.removeprefix("inputs."): t for k, t in tensors.items() if k.startswith("inputs.")}
        if kind == "tensor":
            inputs: Batch = ins["x"]
        elif kind == "tuple":
            inputs = tuple(ins[f"args.{i}"] for i in range(len(ins)))
        else:
            inputs = {k.removeprefix("kwargs."): t for k, t in ins.items()}
        return cls(
            inputs=inputs,
            batch_size=int(header["batch_size"]),
            labels=tensors.get("labels"),
            soft_labels=tensors.get("soft_labels"),
            metadata={k.removeprefix("meta."): t for k, t in tensors.items() if k.startswith("meta.")},
            manifest=header["manifest"],
        )

    @property
    def images(self) -> torch.Tensor:
        """The single input tensor (for image classifiers)."""
        if self._kind != "tensor":
            raise TypeError("this set has several inputs; index batches instead")
        return self._tensors["x"]


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]


class _BatchView(torch.utils.data.Dataset):
    """Map-style dataset of ready batches, with a ``batch_size`` attribute NNCF reads."""

    def __init__(self, cs: CalibrationSet) -> None:
        self.cs = cs
        self.batch_size = cs.batch_size

    def __len__(self) -> int:
        return len(self.cs)

    def __getitem__(self, i: int) -> Batch:
        return self.cs[i]
