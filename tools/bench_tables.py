"""Rewrite a bench JSON's Markdown tables (what ``dfq bench`` writes beside it), without rerunning.

    .venv/bin/python tools/bench_tables.py results/lowbit/lowbit-ptq-resnet20.json
"""
import json
import sys
from pathlib import Path

from dfq_plugins.bench.report import bench_report
from dfq_plugins.io import atomic_write_text

for name in sys.argv[1:]:
    path = Path(name)
    records = json.loads(path.read_text())["records"]
    atomic_write_text(path.with_suffix(".md"), bench_report(records) + "\n")
    print(f"wrote {path.with_suffix('.md')}")
