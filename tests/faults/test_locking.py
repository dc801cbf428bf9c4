"""Fault matrix, concurrency: two identical runs at once compute the set once and share it."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

RUN = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from dfq_plugins.synthesizers.zeroq import ZeroQSynthesizer
    import dfq_plugins
    from tests.conftest import TINY_SPEC, make_tiny

    original = ZeroQSynthesizer.optimize_batch
    def counted(self, teacher, n, seed, index, bar, targets=None):
        with open({log!r}, "a") as f:
            f.write(f"{{index}}\\n")
        return original(self, teacher, n, seed, index, bar, targets)
    ZeroQSynthesizer.optimize_batch = counted
    cs = dfq_plugins.synthesize(make_tiny(), {{"name": "zeroq", "iterations": 150, "synthesis_batch_size": 8}},
                                input_spec=TINY_SPEC, num_samples=32, progress=False)
    print(cs.content_hash())
""")


def test_two_identical_runs_at_once_compute_the_set_once(tmp_path):
    log = tmp_path / "batches.log"
    code = RUN.format(root=str(ROOT), log=str(log))
    env = dict(os.environ, DFQ_CACHE=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    hashes = {o[0].strip() for o in outs}
    assert len(hashes) == 1
    assert sorted(log.read_text().split()) == ["0", "1", "2", "3"]  # four batches, made once
    assert any("waiting for another process" in o[1] for o in outs)
