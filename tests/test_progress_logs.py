"""In a non-TTY log, progress is a few log lines, never a bar's carriage returns."""
from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import dfq_plugins
from dfq_plugins import progress

from .conftest import TINY_SPEC, make_tiny


def test_non_tty_progress_is_log_lines(caplog, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="dfq_plugins"):
        dfq_plugins.synthesize(make_tiny(), {"name": "zeroq", "iterations": 3, "synthesis_batch_size": 4},
                               input_spec=TINY_SPEC, num_samples=8, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "dfq_plugins"]
    assert lines and "started" in lines[0] and "done" in lines[-1]
    assert all("\r" not in line for line in lines)


def test_a_piped_cli_run_writes_short_lines(resnet20):
    """What CI or nohup sees: stderr is a pipe; progress comes as short log lines."""
    code = textwrap.dedent("""
        import sys
        from dfq_plugins.cli import main
        sys.exit(main(["synthesize", "--source", "zeroq", "--images", "8", "--set", "zeroq.iterations=3",
                       "--set", "zeroq.synthesis_batch_size=8"]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "\r" not in out.stderr
    assert max(len(line) for line in out.stderr.splitlines() or [""]) < 400
    assert "dfq zeroq 8 images: started" in out.stderr and "done 3/3" in out.stderr
