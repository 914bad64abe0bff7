"""benchmarks/peers.py runs every contestant end to end (tiny data, one step per epoch) and reports
a table and a JSON file. A smoke test of the benchmark's plumbing: it asserts no speed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_peers_benchmark_runs_every_contestant(tmp_path) -> None:
    pytest.importorskip("lightning", reason="the Lightning contestant needs `pip install .[bench]`")
    out = tmp_path / "peers.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "peers.py"), "--train-samples", "128",
           "--test-samples", "32", "--epochs", "2", "--max-steps", "1", "--batch-size", "16",
           "--procs", "1", "--malloc", "on", "--workers", "0", "--threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=540,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    rows = {r["contestant"]: r for r in result["rows"]}
    assert set(rows) == {"distrain", "bench", "accelerate", "lightning", "seed"}
    assert len(rows["bench"]["epoch_img_per_s"]) == 1 and rows["bench"]["epoch_img_per_s"][0] > 0
    (bench_run,) = [r for r in result["runs"] if r["contestant"] == "bench"]
    assert "window(s) of 1 optimizer steps" in bench_run["timed"], bench_run  # says what it timed
    assert len(bench_run["windows"]) == 3 and min(bench_run["windows"]) > 0, bench_run
    for name, row in rows.items():
        if name == "bench":
            continue
        assert len(row["epoch_img_per_s"]) == 2 and min(row["epoch_img_per_s"]) > 0, name
        assert row["sum_peak_rss_mib"] > 0 and row["user_s"] > 0, name
    assert all(len(rows[n]["distrain_over_this"]) == 2
               for n in ("bench", "accelerate", "lightning", "seed"))
    assert all(run["exit"] == 0 for run in result["runs"])
    for name in rows:
        assert name in proc.stdout
    assert "img/s per epoch" in proc.stdout and "load average" in proc.stdout
