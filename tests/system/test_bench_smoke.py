"""The benchmark's instrument works (tests/bench, issue 4): its quick datasets are generated and one CT ingest
run against passerelled and dcmtk `storescp --ignore` produces a results table with a positive ratio. The
numbers themselves are not checked here (the machine is shared); `tests/bench.sh` measures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.run import parse_table

TESTS = Path(__file__).resolve().parents[1]


def test_quick_ingest_run_produces_a_parsable_ratio_table(tmp_path: Path) -> None:
    out = tmp_path / "PERFORMANCE.md"
    cp = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--out", str(out)],
        cwd=TESTS, capture_output=True, text=True, timeout=60,
        env={**os.environ, "BENCH_WORK": str(tmp_path / "work")},
    )  # fmt: skip
    assert cp.returncode == 0, f"bench.run --smoke failed ({cp.returncode}):\n{cp.stdout[-3000:]}\n{cp.stderr[-3000:]}"
    rows = parse_table(out.read_text())
    ratio = [r for r in rows if r["measure"] == "CT, 1 assoc: passerelled / storescp --ignore (instances/s)"]
    assert ratio, f"no passerelled/storescp ratio row in:\n{out.read_text()}"
    median = float(ratio[0]["median (min–max)"].split()[0])
    assert median > 0
    text = out.read_text()
    assert "| passerelled | ct | 1 |" in text and "| storescp --ignore | ct | 1 |" in text
    assert "nproc:" in text and "kernel:" in text
