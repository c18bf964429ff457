"""bench/bench_blend.py runs end to end (its figures are for docs/BENCHMARKS.md, not tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_blend_benchmark_checks_its_bytes_and_writes_its_table(tmp_path) -> None:
    out = tmp_path / "bench_blend.md"
    run = subprocess.run([sys.executable, "-m", "bench.bench_blend", "--rounds", "1",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    text = out.read_text()
    assert "| blend + picture for the encoder (base kept in I420) |" in text
    assert "| frame for aiortc (its encoders take yuv420p) |" in text
    rows = [line.split("|")[2:5] for line in text.splitlines() if line.startswith("| ")][2:]
    assert len(rows) == 2 and all(float(v) > 0 for row in rows for v in row)
