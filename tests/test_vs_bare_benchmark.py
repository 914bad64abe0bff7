"""benchmarks/vs_bare.py runs both contestants in fresh processes under both malloc settings and
reports medians and ratios (tiny data, one step per window). A smoke test of the plumbing; it
asserts no speed. (That ``MALLOC_*`` variables give a process that never runs distrain the same
behaviour as distrain's own setting is tested in test_allocator.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_vs_bare_runs_both_loops_under_both_malloc_settings(tmp_path) -> None:
    out = tmp_path / "vs_bare.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "vs_bare.py"), "--model", "cifar10_quick",
           "--batch-size", "16", "--samples", "64", "--steps", "1", "--warmup", "0",
           "--repeats", "2", "--rounds", "1", "--threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=280,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    runs = {(r["contestant"], r["malloc"]): r for r in result["runs"]}
    assert set(runs) == {(n, m) for n in ("distrain", "bare") for m in ("off", "on")}
    assert all(r["img_per_s"] > 0 and len(r["windows"]) == 2 for r in runs.values())
    assert set(result["ratios"]) == {"distrain / bare, as each runs (on / off)",
                                     "distrain / bare, both malloc on (fair)",
                                     "distrain / bare, both malloc off"}
    assert "distrain / bare, as each runs (on / off):" in proc.stdout
