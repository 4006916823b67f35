"""The benchmarks run (one tiny iteration each) and write their JSON. Timings are never asserted."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_benchmark_runs_on_a_tiny_model(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--output-dir", str(tmp_path)],
                               cwd=ROOT, capture_output=True, text=True, check=False, timeout=1800)  # a busy 2-core machine: 600 s ran out
    assert completed.returncode == 0, completed.stderr[-3000:]
    written = {path.stem: json.loads(path.read_text()) for path in tmp_path.glob("*.json")}
    assert set(written) == {"subspace", "overhead", "refresh", "refusal_margin", "barrier", "memory_quick",
                            "merge_quick"}
    assert set(written["barrier"]["ratio_by_refresh_period"]) == {"1", "2", "4", "8"}
    assert written["overhead"]["results"] and written["refresh"]["speedup"] > 0
    assert {row["mode"] for row in written["memory_quick"]["results"]} == {"none", "update", "grad"}
    assert "| mode" in completed.stdout and "compute_subspace" in completed.stdout
