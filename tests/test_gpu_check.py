"""The GPU acceptance run's dry run (`GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh OUT`) on the CPU.

Every step of the real run must run and be recorded in OUT/gpu_check.json, and the table must be the
last thing printed: on a lent GPU there is no time to debug the script itself. What the dry run
measures is meaningless and is not checked.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env

# Steps that may legitimately not run in the dry run here: no wheelhouse carried (DeepSpeed is installed
# in this venv already, and the wheelhouse step would only re-install it).
MAY_SKIP = {"deepspeed_wheels"}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_dry_run_records_every_step_and_prints_the_table_last(tmp_path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    out = tmp_path / "check"
    env = subprocess_env(GPU_CHECK_DRY="1", GPU_CHECK_PYTHON=sys.executable, GPU_CHECK_BUDGET_S="1300",
                         GPU_CHECK_WHEELS=str(tmp_path / "no-wheels"))
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=1450)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads((out / "gpu_check.json").read_text())
    assert rec["dry_run"] is True and rec["finished"]
    names = [name for name, _, _ in gpu_check.plan(gpu_check.Sizes.make(True))]
    assert list(rec["steps"]) == names
    not_ok = {n: s for n, s in rec["steps"].items() if s["status"] != "ok" and n not in MAY_SKIP}
    assert not not_ok, json.dumps(not_ok, indent=1)[:3000]
    for name, s in rec["steps"].items():
        assert (out / s["log"]).exists() or s["status"] == "skipped", name
    assert rec["steps"]["convergence"]["fp32"]["loss"] and rec["steps"]["convergence"]["bf16"]["loss"]
    assert "agree" in rec["steps"]["convergence"]
    assert rec["steps"]["pytest_gpu"]["counts"]["skipped"] > 0  # no CUDA here: every gpu test skipped
    assert all(t["message"] for t in rec["steps"]["pytest_gpu"]["tests"])  # each with its reason
    assert set(rec["step_vs_bare"]) >= {"quick_b16", "vgg16_32"}
    table = (out / "gpu_check.txt").read_text().strip()
    assert p.stdout.strip().endswith(table) and table.splitlines()[0].startswith("distrain GPU check")
    assert all(n in table for n in names)
