"""``export`` a quantized model in its toolchain's deployable format and ``load`` it back.

Formats: ``pt2`` (a ``torch.export`` program: torchao PT2E, and the FX reference model below
8 bits) and ``openvino`` (an OpenVINO IR .xml + .bin, from NNCF's model). Nothing here unpickles:
``torch.export.load`` runs with ``torch.load`` forced to ``weights_only=True`` (torch would
otherwise fall back to a full unpickle on failure), and a file whose sha256 differs from its
sidecar is refused before it is parsed.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..device import module_device
from ..errors import CorruptArtifactError, DFQError
from ..export_shapes import batch_dynamic_shapes
from ..io import atomic_write
from ..spec import InputSpec
from .sidecar import artifact_files, read_sidecar, sidecar_path, write_sidecar

FORMATS = {"pt2": ".pt2", "openvino": ".xml"}
DEFAULT_FORMAT = {"torchao-pt2e": "pt2", "torch-ao-fx": "pt2", "nncf": "openvino"}
# What a .pt2 program's operators need imported before torch.export can resolve them (the
# quantized_decomposed ops register on import), by the toolchain that made it: (module, pip package).
PT2_RUNTIME = {
    "torchao-pt2e": [("torchao.quantization.pt2e", "torchao")],
    "torch-ao-fx": [("torch.ao.quantization.fx._decomposed", "torch (a release that still ships torch.ao)")],
}


class ExportError(DFQError, ValueError):
    """A model that cannot be written in the asked format (and what to do instead)."""


def dfq_info(model: Any) -> dict[str, Any]:
    """What ``quantize`` recorded on its result: toolchain, scheme, source, calibration hash, spec."""
    return dict(getattr(model, "_dfq_info", None) or {})


def export(qmodel: nn.Module, path: str | Path, *, format: str | None = None, input_spec: InputSpec | None = None,
           toolchain: str | None = None, record: dict[str, Any] | None = None) -> Path:
    """Write ``qmodel`` to ``path`` in a deployable format, plus ``PATH.json`` (the sidecar).

    ``qmodel`` is what :func:`dfq_plugins.quantize` returned; the toolchain, scheme, source and
    input spec it recorded go into the sidecar (pass ``input_spec``/``toolchain`` for a model
    from elsewhere). ``record`` adds fields, e.g. the measured ``top1``. Returns the path.
    """
    info = dfq_info(qmodel)
    toolchain = toolchain or info.get("toolchain")
    spec = input_spec or (InputSpec.from_dict(info["input_spec"]) if "input_spec" in info else None)
    if spec is None:
        raise ExportError("export needs the model's input_spec=InputSpec(...) (the example input of the export); "
                          "a model returned by dfq_plugins.quantize carries it")
    fmt = format or DEFAULT_FORMAT.get(str(toolchain))
    if fmt not in FORMATS:
        raise ExportError(f"format={fmt!r}; choose one of {sorted(FORMATS)} (toolchain {toolchain!r} "
                          f"defaults to {DEFAULT_FORMAT.get(str(toolchain), 'none: name one')})")
    path = Path(path)
    if path.suffix != FORMATS[fmt]:
        raise ExportError(f"a {fmt} artefact is a '{FORMATS[fmt]}' file; got {path.name}")
    example = spec.example(2, module_device(qmodel)).normal_()
    started = time.perf_counter()
    try:
        if fmt == "pt2":
            _export_pt2(qmodel, path, example)
        else:
            _export_openvino(qmodel, path, example)
        body = {"format": fmt, "toolchain": toolchain, "input_spec": spec.to_dict(),
                "export_seconds": round(time.perf_counter() - started, 2),
                **{k: v for k, v in info.items() if k not in ("toolchain", "input_spec")}, **(record or {})}
        write_sidecar(path, body)
    except OSError as exc:  # a read-only or full disk: keep a previous export only if it still verifies
        try:
            read_sidecar(path)
        except Exception:  # noqa: BLE001 - anything that does not verify is removed, never left half-written
            for f in [*artifact_files(path), sidecar_path(path)]:
                with contextlib.suppress(OSError):
                    f.unlink(missing_ok=True)
        raise ExportError(f"cannot write {path} ({exc.strerror or exc}); export to a writable folder with free "
                          "space") from exc
    return path


def without_unused_tensors(model: nn.Module) -> nn.Module:
    """A copy of a GraphModule without the parameters and buffers its graph never reads.

    torchao's ``convert_pt2e`` folds each weight into an int8 constant but leaves the float
    original on the module; exported as is, a ResNet-20 .pt2 held both (1.72 MB against 1.35 MB
    for FP32). Other models are returned unchanged."""
    import copy

    graph = getattr(model, "graph", None)
    if graph is None:
        return model
    used: set[str] = set()
    prefixes: list[str] = []
    for node in graph.nodes:
        if node.op == "get_attr":
            used.add(str(node.target))
        elif node.op == "call_module":
            prefixes.append(str(node.target) + ".")
    pruned = copy.deepcopy(model)
    names = [n for n, _ in pruned.named_parameters()] + [n for n, _ in pruned.named_buffers()]
    for name in names:
        if name in used or any(name.startswith(p) for p in prefixes):
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = pruned.get_submodule(owner_name) if owner_name else pruned
        delattr(owner, attr)
    return pruned


def _export_pt2(qmodel: nn.Module, path: Path, example: torch.Tensor) -> None:
    qmodel = without_unused_tensors(qmodel)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(qmodel, (example,), dynamic_shapes=batch_dynamic_shapes(1))
    except Exception as exc:  # torch.export raises many types; name the usual cause
        packed = "PackedParams" in str(exc) or "__obj_flatten__" in str(exc)
        hint = ("torch.ao FX's int8 model holds fbgemm packed-weight objects that torch.export cannot write; "
                "quantize with toolchain torchao-pt2e (the same X86 int8 scheme, exported as a program)"
                if packed else "check that the model is traceable by torch.export")
        raise ExportError(f"torch.export failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                          f"{hint}") from exc
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: torch.export.save warns on a temp name not ending in .pt2
            torch.export.save(program, f)

    atomic_write(path, write)


def _export_openvino(qmodel: nn.Module, path: Path, example: torch.Tensor) -> None:
    ov = _openvino()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ov_model = ov.convert_model(qmodel.eval(), example_input=example.cpu())
    ov_model.reshape({ov_model.inputs[0]: ov.PartialShape([-1, *example.shape[1:]])})  # any batch
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:  # .xml and .bin written aside, then moved in: the .bin first, so a visible .xml is complete
        ov.save_model(ov_model, str(tmp / path.name), compress_to_fp16=False)
        os.replace(tmp / path.with_suffix(".bin").name, path.with_suffix(".bin"))
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _openvino() -> Any:
    try:
        import openvino as ov
    except ImportError as exc:
        raise ExportError("the openvino format needs OpenVINO: pip install -e 'adapters/nncf[openvino]' "
                          "(or pip install openvino)") from exc
    return ov


def import_pt2_runtime(info: dict[str, Any]) -> None:
    """Import what registers the program's operators, named by the sidecar's toolchain: in a new
    process torch.export cannot resolve ``quantized_decomposed`` ops until their package is imported."""
    toolchain = str(info.get("toolchain"))
    needs = PT2_RUNTIME.get(toolchain) or [m for ms in PT2_RUNTIME.values() for m in ms]
    for module, package in needs:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            if toolchain not in PT2_RUNTIME:
                continue  # unknown maker: import what is there, let torch.export name a missing op
            made_with = (info.get("versions") or {}).get(package.split()[0])
            raise ExportError(f"this artefact was made with {toolchain}"
                              f"{f' ({package.split()[0]} {made_with})' if made_with else ''} and its operators "
                              f"need {package} to load: pip install {package.split()[0]} ({exc})") from exc


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """``torch.load`` that refuses to unpickle anything but tensors and plain containers.

    ``torch.export.load`` retries a failed weights-only load with a full unpickle (before torch 2.10 it
    always asks for one); within this context every load is weights-only, and one that needs more raises."""
    original = torch.load

    def strict(*args: Any, **kwargs: Any) -> Any:
        asked_for_unpickle = kwargs.get("weights_only") is False  # torch < 2.10 always asks; plain tensors load
        kwargs["weights_only"] = True
        try:
            return original(*args, **kwargs)
        except Exception as exc:
            if not asked_for_unpickle:
                raise
            raise CorruptArtifactError("the program's weights need a full unpickle (custom objects); "
                                       "dfq_plugins never unpickles a deployed artefact") from exc

    torch.load = strict
    try:
        yield
    finally:
        torch.load = original


def refuse_pickle(path: Path) -> None:
    """A ``torch.save`` file (what ``--save`` used to write) is a pickle: say so, never open it."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] == b"\x80":
            raise CorruptArtifactError(f"{path} is a pickle; dfq_plugins does not load pickles (they run code). "
                                       "Export the model with dfq_plugins.export / dfq quantize --export")
        raise CorruptArtifactError(f"{path} is not a torch.export program (.pt2 zip archive)")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    if any(n.endswith("/data.pkl") for n in names) and not any("/models/" in n for n in names):
        raise CorruptArtifactError(f"{path} is a torch.save pickle, not a torch.export program; dfq_plugins does "
                                   "not load pickles (they run code). Export with dfq_plugins.export")


@dataclass
class Deployed:
    """A loaded artefact: call it on a batch of normalised images (a torch tensor) for logits."""

    path: Path
    info: dict[str, Any]
    run: Callable[[torch.Tensor], torch.Tensor]
    module: nn.Module | None = None  # the torch program (pt2), for torch.compile
    backend: str = "eager"
    extras: dict[str, Any] = field(default_factory=dict)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.from_dict(self.info["input_spec"])

    def compiled(self) -> Deployed:
        """The pt2 program lowered by ``torch.compile`` (x86 Inductor, constants frozen): the real int8
        kernels on CPU. The first call compiles (tens of seconds)."""
        if self.module is None:
            raise ExportError(f"{self.info['format']} artefacts run on their own runtime already")
        return Deployed(self.path, self.info, _no_grad(inductor_compiled(self.module), quiet=True), self.module,
                        "inductor")


def inductor_compiled(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile`` for CPU inference: x86 Inductor with frozen constants (int8 weight
    prepacking needs them; FP32 gains from it too)."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(module)


def _no_grad(fn: Callable[[torch.Tensor], torch.Tensor], quiet: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` without autograd; ``quiet``: without the warnings Inductor's int8 lowering prints while compiling."""
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
            return fn(x)
    return run


OV_PRECISIONS = {"f32": "f32", "bf16": "bf16", "f16": "f16"}


def load(path: str | Path, *, verify: bool = True, threads: int | None = None,
         precision: str | None = None) -> Deployed:
    """Load an artefact written by :func:`export`, checking its sidecar's sha256 first (``verify``).

    ``threads``: OpenVINO's inference threads (torch uses ``torch.set_num_threads``).
    ``precision``: OpenVINO's floating-point inference precision (``"f32"``, ``"bf16"``); None keeps
    the runtime's default, which is **bf16** on CPUs with AMX or AVX512-BF16: an "FP32" IR then runs
    in bf16, so time a true FP32 baseline with ``precision="f32"``."""
    path = Path(path)
    if precision is not None and precision not in OV_PRECISIONS:
        raise ValueError(f"precision={precision!r}; choose one of {sorted(OV_PRECISIONS)} or None (runtime default)")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    info = read_sidecar(path, verify=verify)
    fmt = info.get("format")
    if fmt == "pt2":
        refuse_pickle(path)
        import_pt2_runtime(info)
        with weights_only_loads(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.export.load(str(path)).module()
        with contextlib.suppress(ImportError):
            from torchao.quantization.pt2e import allow_exported_model_train_eval

            allow_exported_model_train_eval(module)
        return Deployed(path, info, _no_grad(module), module, "eager")
    if fmt == "openvino":
        ov = _openvino()
        core = ov.Core()
        config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads} if threads else {}
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = OV_PRECISIONS[precision]
        compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        request = compiled.create_infer_request()

        def run(x: torch.Tensor) -> torch.Tensor:
            out = request.infer({0: x.detach().cpu().numpy()})
            return torch.from_numpy(next(iter(out.values())).copy())

        backend = f"openvino {compiled.get_property('INFERENCE_PRECISION_HINT').to_string()}"
        return Deployed(path, info, run, None, backend, {"compiled": compiled})
    raise CorruptArtifactError(f"{sidecar_path(path)} names format {fmt!r}, which this version cannot load")


__all__ = ["DEFAULT_FORMAT", "FORMATS", "Deployed", "ExportError", "export", "load", "refuse_pickle",
           "weights_only_loads"]
