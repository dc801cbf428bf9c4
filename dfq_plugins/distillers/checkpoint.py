"""Training checkpoints as safetensors + JSON (no pickle), written atomically.

A checkpoint holds the state dicts of the student, any generator, and the optimizers (their
tensors in the safetensors body, everything else in its JSON header), plus the step reached,
the wall time spent so far and the distiller's own small state. ``key`` identifies the run
(teacher, toolchain, scheme, data, config, seed): a checkpoint of another run is refused.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from ..errors import CorruptArtifactError
from ..io import atomic_write, tensors_hash

_HEADER = "dfq_checkpoint"
FORMAT = 1


def _optimizer_split(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.{pid}.{k}"] = v.detach().cpu().clone().contiguous()
            else:
                other.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "state": other}


def _optimizer_join(meta: dict[str, Any], tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(pid): dict(v) for pid, v in meta["state"].items()}
    for name, t in tensors.items():
        if name.startswith(prefix + "."):
            pid, key = name[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(pid), {})[key] = t
    return {"state": state, "param_groups": meta["param_groups"]}


def _module_tensors(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()
            if torch.is_tensor(v)}


def save_checkpoint(path: Path, *, key: str, step: int, elapsed: float, modules: dict[str, nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], extra: dict[str, Any]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    opt_meta: dict[str, Any] = {}
    for name, module in modules.items():
        tensors.update(_module_tensors(module, f"module.{name}"))
    for name, opt in optimizers.items():
        t, meta = _optimizer_split(opt, f"optim.{name}")
        tensors.update(t)
        opt_meta[name] = meta
    header = {"format": FORMAT, "key": key, "step": step, "elapsed": elapsed, "optimizers": opt_meta,
              "extra": extra, "content_hash": tensors_hash(tensors)}
    text = json.dumps(header, default=str)
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={_HEADER: text}))


def _shapes_fit(key: str, own: tuple[int, ...], saved: tuple[int, ...]) -> bool:
    """A reset per-channel observer holds empty ranges until it sees data; its load resizes them
    (an online distiller resets its observers before a resumed run restores them)."""
    return own == saved or (own == (0,) and key.endswith(("min_val", "max_val")))


def _check_fits(path: Path, name: str, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = {k: tuple(v.shape) for k, v in module.state_dict().items() if torch.is_tensor(v)}
    saved = {k: tuple(v.shape) for k, v in state.items()}
    if set(own) != set(saved) or not all(_shapes_fit(k, own[k], saved[k]) for k in own):
        odd = sorted(set(own) ^ set(saved)) or [k for k in own if not _shapes_fit(k, own[k], saved[k])]
        raise CorruptArtifactError(f"{path} holds a {name} of another model ({len(odd)} tensors differ, e.g. "
                                   f"{odd[0]!r}); delete it to restart this run")


def _with_versions(state: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own per-submodule versions on a state read from safetensors: without them an
    observer takes the state for a version-1 one and overwrites its saved ``eps`` with float32's."""
    out = OrderedDict(state)
    out._metadata = getattr(module.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    return out


def load_checkpoint(path: Path, *, key: str, modules: dict[str, nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Any]:
    """Restore modules and optimizers in place; returns the header (step, elapsed, extra)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})[_HEADER])
        tensors = load_file(str(path))
    except Exception as exc:
        raise CorruptArtifactError(f"{path} is not a readable dfq checkpoint ({type(exc).__name__}: {exc}); "
                                   "delete it to restart this run from step 0") from exc
    if header.get("format") != FORMAT or header.get("key") != key:
        raise CorruptArtifactError(f"{path} belongs to another run (or format); delete it to restart this run")
    if tensors_hash(tensors) != header["content_hash"]:
        raise CorruptArtifactError(f"{path}: content hash mismatch (damaged file); delete it to restart this run")
    for name, module in modules.items():
        prefix = f"module.{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        _check_fits(path, name, module, state)  # before loading: load_state_dict copies what fits, then raises
        module.load_state_dict(_with_versions(state, module))
    for name, opt in optimizers.items():
        opt.load_state_dict(_optimizer_join(header["optimizers"][name], tensors, f"optim.{name}"))
    return header
