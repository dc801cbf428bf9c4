"""The public verbs: synthesize a calibration set, quantize a model through a toolchain."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed, plugins
from .data import CalibrationSet
from .device import module_device, placed, resolve_device
from .io import cache_root, entry_lock, short_hash, writable_folder
from .progress import log
from .scheme import QuantScheme
from .spec import InputSpec
from .teacher import Teacher, borrowed_teacher


def resolve_model(model: nn.Module | str, input_spec: InputSpec | None) -> tuple[nn.Module, InputSpec]:
    """A model name from the model plugins, or a module plus its (required) InputSpec."""
    if isinstance(model, str):
        model, spec = plugins.get("models", model).obj.load()
        return model, input_spec or spec
    if input_spec is None:
        raise ValueError("pass input_spec=InputSpec(shape=(C, H, W), mean=..., std=..., num_classes=...): the "
                         "input normalisation decides what synthetic images look like and cannot be guessed")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or a model plugin name, got {type(model).__name__}")
    if not isinstance(input_spec, InputSpec):
        raise TypeError(f"input_spec must be an InputSpec, got {type(input_spec).__name__}")
    input_spec.check_model(model)
    return model, input_spec


def split_named(spec: str | dict[str, Any], what: str) -> tuple[str, dict[str, Any]]:
    """``"zeroq"`` -> ("zeroq", {}); ``{"name": "zeroq", "iterations": 100}`` -> ("zeroq", {...})."""
    if not isinstance(spec, dict):
        return spec, {}
    config = dict(spec)
    name = config.pop("name", None)
    if not name:
        raise ValueError(f"a {what} given as a table needs a 'name' key, got {sorted(spec)}")
    return name, config


def make_synthesizer(source: str | dict[str, Any], data: Any = None) -> Any:
    """``"zeroq"`` or ``{"name": "zeroq", "iterations": 100, ...}`` -> a configured synthesizer."""
    name, config = split_named(source, "source")
    if name == "real" and data is not None:
        config["data"] = data
    return plugins.instantiate("synthesizers", name, config)


def calibration_cache_path(teacher: Teacher, synth: Any, num_samples: int, seed: int, *,
                           with_spec: bool = True) -> Path:
    """Where a set lives: keyed by everything that changes what is synthesized, the InputSpec
    (normalisation, pixel range, shape, classes) included. ``with_spec=False`` is the key sets had
    before the spec was part of it; such a set is reused only if its manifest's spec matches."""
    fields = {"teacher": teacher.fingerprint(), "method": synth.name, "version": synth.version,
              "config": synth.config_dict(), "seed": seed, "num_samples": num_samples, "format": 1}
    if with_spec:
        fields["input_spec"] = teacher.spec.to_dict()
    return cache_root() / "calibration" / f"{synth.name}-{short_hash(fields)}.safetensors"


def _adopt_legacy_set(teacher: Teacher, synth: Any, num_samples: int, seed: int, path: Path) -> None:
    """A set cached under the key without the spec moves to the new key when its manifest says it
    was made with this very spec (else it stays, and this spec gets its own set)."""
    legacy = calibration_cache_path(teacher, synth, num_samples, seed, with_spec=False)
    if path.exists() or not legacy.exists():
        return
    try:
        made_with = CalibrationSet.load(legacy).manifest.get("input_spec")
    except Exception:  # noqa: BLE001 - an unreadable legacy file is simply not reused
        return
    if made_with is not None and InputSpec.from_dict(made_with) == teacher.spec:
        with contextlib.suppress(OSError):  # a read-only cache: synthesize under the new key instead
            os.replace(legacy, path)
        with contextlib.suppress(OSError):
            os.replace(legacy.with_suffix(".json"), path.with_suffix(".json"))


def cache_key_fields(teacher: Teacher, synth: Any, num_samples: int, seed: int) -> dict[str, Any]:
    """What a cached set's manifest must say it holds for the key it is stored under."""
    return {"teacher": teacher.fingerprint(), "method": synth.name, "method_version": synth.version,
            "config": json.loads(json.dumps(synth.config_dict(), default=str)), "seed": seed,
            "num_samples": num_samples, "input_spec": teacher.spec.to_dict()}


def unsigned_set_mismatch(cs: CalibrationSet, expected: dict[str, Any]) -> list[str]:
    """The fields where an unsigned set's manifest disagrees with what its cache key stands for."""
    manifest = json.loads(json.dumps(cs.manifest, default=str))
    wanted = json.loads(json.dumps(expected, default=str))
    return [k for k, v in wanted.items() if manifest.get(k) != v]


def load_cached_set(path: Path, expected: dict[str, Any] | None = None) -> CalibrationSet | None:
    """A cached set, verified. One written before header hashing carries no signature over its
    manifest: it is re-signed only when its manifest says exactly what its cache key stands for
    (``expected``, see :func:`cache_key_fields`) and its pixels match its content hash. Otherwise
    it is moved aside with a warning and None is returned, so the caller synthesizes afresh."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cs = CalibrationSet.load(path)
    unsigned = any("older dfq-plugins" in str(w.message) for w in caught)
    for w in caught:
        if "older dfq-plugins" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not unsigned:
        return cs
    wrong = ["the cache key to check it against"] if expected is None else unsigned_set_mismatch(cs, expected)
    if wrong:
        aside = path.with_name(path.name + ".rejected")
        with contextlib.suppress(OSError):
            os.replace(path, aside)
        warnings.warn(f"{path.name} has no signature over its manifest, and its manifest does not say what its "
                      f"cache key stands for ({', '.join(wrong)}); it was moved to {aside.name} and the set is "
                      "synthesized afresh", stacklevel=2)
        return None
    with contextlib.suppress(OSError):  # a read-only cache keeps the old file; its pixels and manifest were checked
        cs.save(path)
    return cs


def synthesize(model: nn.Module | str, source: str | dict[str, Any] = "zeroq", *,
               input_spec: InputSpec | None = None, num_samples: int = 256, batch_size: int = 32, seed: int = 0,
               data: Any = None, cache: bool = True, progress: bool = True,
               device: str | torch.device | None = None) -> CalibrationSet:
    """Synthesize (or load from the cache) a calibration set for ``model``.

    The cache key is (teacher fingerprint, method, config, seed, size, InputSpec). An interrupted
    run keeps its finished batches and resumes from them. ``device``: where to compute (``None``
    or ``"auto"``: where the model is; ``"cuda"`` moves it there for the run and back after). The
    set comes back on the CPU, and its manifest names the device that made it; the cache key does
    not, so a set made on a GPU is reused on a CPU.
    """
    model, spec = resolve_model(model, input_spec)
    dev = resolve_device(device, model)
    synth = make_synthesizer(source, data)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    world = distributed.init_from_env(dev)
    with placed(model, dev), borrowed_teacher(model, spec) as teacher:
        path = calibration_cache_path(teacher, synth, num_samples, seed) if cache and synth.cacheable else None
        if path is None:
            return _synthesize_now(synth, teacher, num_samples, seed, batch_size, progress, None)
        if world.is_main:
            _adopt_legacy_set(teacher, synth, num_samples, seed, path)
        if not distributed.agree(path.exists(), world):
            if world.is_main:
                writable_folder(path.parent)  # a clear error now, not after minutes of synthesis
            # an identical run elsewhere: wait, then reuse its set (rank 0 waits for the whole group)
            with distributed.main_rank_lock(world, entry_lock(path, f"{synth.name} set")):
                if not distributed.agree(path.exists(), world):
                    return _synthesize_now(synth, teacher, num_samples, seed, batch_size, progress, path)
        if not path.exists():
            raise distributed.DistributedError(
                f"rank {world.rank} cannot see {path}, which rank 0 has: every rank needs the same cache, so put "
                "DFQ_CACHE on a filesystem all nodes share")
        # rank 0 checks (and may re-sign or set aside) the file; the others read what it decided on
        cs = load_cached_set(path, cache_key_fields(teacher, synth, num_samples, seed)) if world.is_main else None
        if not distributed.agree(cs is not None, world):
            return _synthesize_now(synth, teacher, num_samples, seed, batch_size, progress, path)
        if cs is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # rank 0 has said it already
                cs = CalibrationSet.load(path)
        log.info("reusing the cached %s set %s (%d images)", synth.name, path.name, cs.num_samples)
        return cs.with_batch_size(batch_size) if cs.batch_size != batch_size else cs


def _synthesize_now(synth: Any, teacher: Teacher, num_samples: int, seed: int, batch_size: int, progress: bool,
                    path: Path | None) -> CalibrationSet:
    """Synthesize; under torch.distributed every rank takes part and returns the whole set, and
    rank 0 alone writes it (the others wait until it is there)."""
    world = distributed.current()
    workdir = path.with_suffix(".partial") if path is not None else None
    started = time.perf_counter()
    cs = synth.synthesize(teacher, num_samples, seed=seed, batch_size=batch_size, progress=progress,
                          workdir=workdir)
    cs.manifest["synth_seconds"] = round(time.perf_counter() - started, 3)
    cs.manifest["device"] = str(teacher.device)
    if world.distributed:
        cs.manifest["world_size"] = world.size
    if path is None:
        return cs
    try:
        if world.is_main:
            try:
                cs.save(path)
            except OSError as exc:  # the cache went away or read-only during the run: keep the result
                warnings.warn(f"could not cache the synthesized set at {path} ({type(exc).__name__}: {exc}); "
                              "it is returned all the same, save it with .save(path)", stacklevel=3)
                return cs
            shutil.rmtree(workdir, ignore_errors=True)
    finally:
        distributed.barrier(world)
    return cs


def quantize(model: nn.Module | str, *, toolchain: str | dict[str, Any] = "torch-ao-fx",
             source: str | dict[str, Any] | CalibrationSet = "zeroq", scheme: str | dict | QuantScheme = "w8a8",
             input_spec: InputSpec | None = None, num_samples: int = 256, batch_size: int = 32, seed: int = 0,
             data: Any = None, distill: str | dict[str, Any] | None = None, steps: int | None = None,
             trainable: bool = False, cache: bool = True, progress: bool = True,
             device: str | torch.device | None = None) -> nn.Module:
    """Data-free quantization in one call; returns the toolchain's own quantized model.

    ``distill="kd"`` (or ``adadfq``, ``causal``, ``diffdfq``, ``reconstruct``, or a config table)
    fine-tunes the calibrated student against the FP model for ``steps`` steps before converting
    it. A chain, ``"reconstruct+kd"`` or a list, runs its stages in order on the same student;
    ``steps`` then sets the last stage's steps.
    ``trainable=True`` returns the calibrated (and distilled) fake-quant student instead.
    ``device``: where synthesis, calibration and distillation run (``None``: the model's device);
    the result lives there, and ``model`` is given back where it was.
    """
    model, spec = resolve_model(model, input_spec)
    dev = resolve_device(device, model)
    q_scheme = QuantScheme.parse(scheme)
    chain = make_toolchain(toolchain)
    chain.check_scheme(q_scheme)  # fail before spending minutes on synthesis
    fine_tuned = trainable or distill is not None
    chain.check_bias_correction(chain.resolve_scheme(q_scheme, fine_tuned), fine_tuned)
    distillers = make_distillers(distill, steps) if distill is not None else None
    distributed.init_from_env(dev)
    with placed(model, dev):
        cs = source if isinstance(source, CalibrationSet) else synthesize(
            model, source, input_spec=spec, num_samples=num_samples, batch_size=batch_size, seed=seed, data=data,
            cache=cache, progress=progress, device=dev)
        if distillers is None:
            return chain.quantize(model, q_scheme, cs, trainable=trainable)
        student = chain.quantize(model, q_scheme, cs, trainable=True)
        student = run_distillers(distillers, model, spec, student, cs, chain, q_scheme, seed=seed, cache=cache,
                                 progress=progress)
        if trainable:
            return student
        from .toolchain import stamp

        return stamp(chain.convert(student), chain, chain.resolve_scheme(q_scheme, True), cs,
                     "+".join(d.name for d in distillers))


def make_distiller(distill: str | dict[str, Any], steps: int | None = None) -> Any:
    """``"kd"`` or ``{"name": "kd", "lr": 0.01, ...}`` -> a configured distiller (``steps`` overrides)."""
    name, config = split_named(distill, "distiller")
    if steps is not None:
        config["steps"] = steps
    return plugins.instantiate("distillers", name, config)


def distill_stages(distill: str | dict[str, Any] | list[str | dict[str, Any]]) -> list[str | dict[str, Any]]:
    """``"reconstruct+kd"`` or a list of names/tables -> the stages, run in order on one student."""
    if isinstance(distill, str):
        stages: list[str | dict[str, Any]] = [part.strip() for part in distill.split("+")]
    elif isinstance(distill, dict):
        stages = [distill]
    elif isinstance(distill, (list, tuple)):
        stages = list(distill)
    else:
        raise TypeError(f"distill must be a distiller name ('kd', 'reconstruct+kd'), a table with a 'name' key, "
                        f"or a list of those; got {type(distill).__name__}")
    if not stages or any(s == "" for s in stages):
        raise ValueError(f"distill={distill!r}: name every stage, e.g. 'reconstruct+kd'")
    return stages


def make_distillers(distill: str | dict[str, Any] | list[str | dict[str, Any]], steps: int | None = None,
                    tables: dict[str, dict[str, Any]] | None = None) -> list[Any]:
    """Configured distillers for a chain; ``steps`` sets the last stage's steps only.

    In ``reconstruct+kd`` the first stage's steps are per block, so one number for both would
    make no sense: earlier stages keep their own (or their table's) steps. ``tables`` (a recipe's
    ``[distillers.NAME]``) configure the stages given by name.
    """
    stages = [{"name": st, **(tables or {}).get(st, {})} if isinstance(st, str) else st
              for st in distill_stages(distill)]
    return [make_distiller(stage, steps if i == len(stages) - 1 else None) for i, stage in enumerate(stages)]


def student_structure(student: nn.Module) -> str:
    """A hash of the student's graph and tensor names and shapes, not its values.

    The teacher's fingerprint covers weights only, so two ways of writing one model (the same
    state_dict, another graph) would otherwise share a checkpoint that fits only one of them.
    """
    shapes = [(k, list(v.shape), str(v.dtype)) for k, v in student.state_dict().items() if torch.is_tensor(v)]
    return short_hash({"code": str(getattr(student, "code", type(student).__qualname__)), "tensors": shapes})


def distill_workdir(teacher: Teacher, distiller: Any, toolchain: Any, scheme: QuantScheme,
                    cs: CalibrationSet | None, seed: int, after: tuple[str, ...] = (),
                    student: nn.Module | None = None) -> tuple[Path, str]:
    """Where a run's checkpoints live, and the key that identifies the run.

    ``after``: the keys of the stages that trained this student before (a chain such as
    ``reconstruct+kd``), so a second stage never resumes a checkpoint of a different start.
    """
    fields = {"teacher": teacher.fingerprint(), "distiller": distiller.name, "version": distiller.version,
              "config": distiller.config_dict(), "toolchain": toolchain.name,
              "toolchain_config": {k: v for k, v in vars(toolchain).items() if not k.startswith("_")},
              "scheme": scheme.for_training().name, "data": None if cs is None else cs.content_hash(), "seed": seed,
              "student": None if student is None else student_structure(student)}
    if after:
        fields["after"] = list(after)
    start = toolchain.student_ranges(scheme) if hasattr(toolchain, "student_ranges") else "observer"
    if start != "observer":  # the student starts elsewhere than where runs cached before this option did
        fields["student_ranges"] = start
    key = short_hash(fields)
    return cache_root() / "distill" / f"{distiller.name}-{key}", key


def run_distiller(distiller: Any, model: nn.Module, spec: InputSpec, student: nn.Module,
                  cs: CalibrationSet | None, toolchain: Any, scheme: QuantScheme, *, seed: int = 0,
                  cache: bool = True, progress: bool = True, after: tuple[str, ...] = ()) -> nn.Module:
    """Fine-tune ``student`` with ``distiller``; cached runs resume from their last checkpoint."""
    with borrowed_teacher(model, spec) as teacher:
        workdir, key = distill_workdir(teacher, distiller, toolchain, scheme, cs, seed, after, student)
        distiller.last_key = key
        if not cache:
            return distiller.distill(teacher, student, cs, toolchain=toolchain, seed=seed, progress=progress,
                                     workdir=None, key=key)
        world = distributed.current()
        if world.is_main:
            writable_folder(workdir.parent)
        # an identical run elsewhere: wait, then resume from it (rank 0 holds the lock for its group)
        with distributed.main_rank_lock(world, entry_lock(workdir, f"{distiller.name} run")):
            return distiller.distill(teacher, student, cs, toolchain=toolchain, seed=seed, progress=progress,
                                     workdir=workdir, key=key)


def run_distillers(distillers: list[Any], model: nn.Module, spec: InputSpec, student: nn.Module,
                   cs: CalibrationSet | None, toolchain: Any, scheme: QuantScheme, *, seed: int = 0,
                   cache: bool = True, progress: bool = True, guard: bool = True) -> nn.Module:
    """Run a chain of distillers on one student, each stage's cache keyed by the stages before it.

    ``guard``: a stage after the first is kept only if the student's agreement with ``model`` on
    the calibration images does not collapse (``distillers.chain_guard``); otherwise the student
    of the stage before is returned, with a warning. Each stage's ``last_guard`` says what happened.
    """
    from .distillers import chain_guard

    checker = chain_guard.ChainGuard(model, toolchain, cs.images) if guard and cs is not None else None
    after: tuple[str, ...] = ()
    for i, distiller in enumerate(distillers):
        distiller.last_guard = None
        keep = checker.before(student) if checker is not None and i > 0 else None
        student = run_distiller(distiller, model, spec, student, cs, toolchain, scheme, seed=seed, cache=cache,
                                progress=progress, after=after)
        if keep is not None:
            student, distiller.last_guard = checker.after(distiller.name, student, keep)
        after = (*after, f"{distiller.name}-{distiller.last_key}")
    return student


def distill(model: nn.Module | str, student: nn.Module, source: CalibrationSet | None = None, *,
            distiller: str | dict[str, Any] | list[str | dict[str, Any]] = "kd",
            toolchain: str | dict[str, Any] = "torch-ao-fx", scheme: str | dict | QuantScheme = "w8a8",
            input_spec: InputSpec | None = None, steps: int | None = None, seed: int = 0, cache: bool = True,
            progress: bool = True, device: str | torch.device | None = None) -> nn.Module:
    """Fine-tune a trainable student (``quantize(..., trainable=True)``) against ``model``.

    ``toolchain`` and ``scheme`` must be the ones the student was prepared with: the loop uses
    the toolchain's own switches (observers, eval mode), and both are part of the cache key.
    ``distiller`` may be a chain (``"reconstruct+kd"``); ``steps`` then sets its last stage's.
    ``device``: where to train (``None``: the student's device); the FP model joins it for the run.
    """
    model, spec = resolve_model(model, input_spec)
    dev = resolve_device(device, student)
    distributed.init_from_env(dev)
    student.to(dev)
    with placed(model, dev):
        return run_distillers(make_distillers(distiller, steps), model, spec, student, source,
                              make_toolchain(toolchain), QuantScheme.parse(scheme), seed=seed, cache=cache,
                              progress=progress)


def make_toolchain(toolchain: str | dict[str, Any]) -> Any:
    if isinstance(toolchain, dict):
        config = dict(toolchain)
        return plugins.instantiate("toolchains", config.pop("name"), config)
    return plugins.instantiate("toolchains", toolchain)


EVAL_BATCH_ELEMENTS = 4_000_000  # input elements per evaluation batch: 250 CIFAR images, 26 at 224x224


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int | None = None) -> float:
    """Top-1 accuracy in percent, computed on the model's device.

    ``batch_size=None`` sizes batches by the image (at most 250): 250 images of 260x260 took EfficientNet-Lite2's
    evaluation 1.8 GB above the model and test set, and a bench beside others was killed for memory.
    """
    if batch_size is None:
        per_image = max(1, images[0].numel()) if images.shape[0] else 1
        batch_size = max(1, min(250, EVAL_BATCH_ELEMENTS // per_image))
    correct = 0
    device = module_device(model)
    for i in range(0, images.shape[0], batch_size):
        logits = model(images[i:i + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == labels[i:i + batch_size].cpu()).sum())
    return 100.0 * correct / images.shape[0]
