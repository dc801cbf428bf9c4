"""The evaluation harness: every source through the same pipeline, scored on real test images."""
from .harness import BenchPlan, run_bench
from .report import markdown_table

__all__ = ["BenchPlan", "markdown_table", "run_bench"]
