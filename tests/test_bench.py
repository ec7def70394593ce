"""The benchmarks' one-command entry from a fresh clone: `make bench-NAME` (docs/benchmarks.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_make_bench_runs_a_benchmark_script_and_prints_its_ratio():
    # STAMP= BIN=...: this interpreter, no install step (make bench-index alone installs first)
    out = subprocess.run(["make", "-s", "bench-index", "STAMP=", f"BIN={Path(sys.executable).parent}",
                          "ARGS=--sizes 3000 --queries 50 --tight-budget-share 0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 3000 |")]
    assert any("exact (Flat)" in r for r in rows) and any("Flat {}" in r for r in rows), out.stdout
    assert "speedup" in out.stdout
