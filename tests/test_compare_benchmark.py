"""benchmarks/compare.py runs end to end (tiny data, one step per window) and prints its JSON: a smoke
test of the benchmark's plumbing against distrain's current API. It asserts no speed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compare_benchmark_runs_both_loops_and_both_pipelines(tmp_path) -> None:
    cmd = [sys.executable, str(REPO / "benchmarks" / "compare.py"), "--samples", "256",
           "--steps", "1", "--batches", "2", "--repeats", "1", "--warmup", "0", "--batch-size", "16",
           "--threads", "1", "--json"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=280,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["samples"] == 256 and result["model"] == "cifar10_quick"
    step = result["step"]
    assert step["bare"]["img_per_s"] > 0 and step["distrain"]["img_per_s"] > 0
    assert step["ratio"] > 0 and step["ratio_cpu_time"] > 0
    pipe = result["pipeline"]
    assert pipe["distrain_device"]["img_per_s"] > 0 and pipe["distrain_dataloader"]["img_per_s"] > 0
    assert pipe["reference"].startswith("seed") or pipe["reference"]
