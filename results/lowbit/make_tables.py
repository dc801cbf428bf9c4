"""Rewrite a bench JSON's Markdown tables (what ``dfq bench`` writes beside it), without rerunning.

    .venv/bin/python results/lowbit/make_tables.py results/lowbit/lowbit-ptq-resnet20.json
"""
import json
import sys
from pathlib import Path

from dfq_plugins.bench.report import distill_table, markdown_table, pivot_table
from dfq_plugins.io import atomic_write_text

for name in sys.argv[1:]:
    path = Path(name)
    records = json.loads(path.read_text())["records"]
    table = markdown_table(records) + "\n\nMean top-1 (min-max over seeds) per source:\n\n" + pivot_table(records)
    if any(r.get("distill") for r in records):
        table += "\n\nFine-tuned rows (top-1 after calibration only, then after distillation):\n\n" + \
            distill_table(records)
    atomic_write_text(path.with_suffix(".md"), table + "\n")
    print(f"wrote {path.with_suffix('.md')}")
