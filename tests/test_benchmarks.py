"""The benchmarks are not timed tests, but CI checks that they still run (at toy scale on a CPU)."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent / "benchmarks"


def test_sweep_benchmark_runs_at_toy_scale_on_cpu(tmp_path, mini_data):
    res = subprocess.run([sys.executable, str(BENCH / "sweep_bench.py"), "--data", str(mini_data), "--seeds", "1",
                          "--workers", "1", "--net", "cnn"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    out = res.stdout
    assert "runs/hour" in out and "mean nothing" in out and "slice: 2 runs" in out
