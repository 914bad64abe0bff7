"""The GPU acceptance run behind `bash benchmarks/gpu_check.sh [OUTDIR]`: every check, one JSON record.

Each step runs as its own subprocess under its own time budget; a step that fails or runs out of time
is recorded (status ``failed`` / ``timeout``, with its log) and the run goes on; a step that would not
fit in what is left of the whole run's budget is ``skipped``. ``OUTDIR/gpu_check.json`` is rewritten
after every step (a run killed half-way still has its first steps) and the table is printed last.

Targets are reported, never asserted: cifar10_quick >= 150,000 training img/s, VGG16 bf16 >= 35% MFU
at 224x224, distrain's step >= 0.95x the bare loop (benchmarks/bare_loop.py) at the same config.

``--dry`` (``GPU_CHECK_DRY=1``): the same steps on the CPU with tiny sizes (CUDA hidden), one
cifar10_quick batch size and one VGG16 input size instead of two, in about two minutes on an idle
2-core machine (each step is a fresh process importing torch); compilation is off there (inductor on a
CPU takes a minute per config) and the install commands run with pip's ``--dry-run``. What is measured in a dry run means nothing; that every step
runs and is recorded does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"quick_img_per_s": 150_000.0, "vgg16_224_mfu": 0.35, "step_vs_bare": 0.95}


@dataclass(frozen=True)
class Sizes:
    """How big each measurement is: the GPU run's, or the dry run's (seconds on a CPU)."""

    dry: bool
    bench_steps: int
    bench_warmup: int
    quick_batches: tuple  # cifar10_quick batch sizes measured
    vgg_batch: int
    vgg_sizes: tuple  # VGG16 input sides measured (the dry run: one, small)
    train_samples: int
    conv_samples: int
    conv_batch: int
    conv_epochs: int
    budget_scale: float  # step budgets are the GPU's; a (shared, 2-core) CPU needs several times more

    @staticmethod
    def make(dry: bool) -> "Sizes":
        if dry:
            return Sizes(True, 1, 0, (16,), 2, (32,), 128, 256, 32, 3, 6.0)
        return Sizes(False, 100, 20, (512, 2048), 128, (32, 224), 50_000, 10_240, 128, 4, 1.0)


class Run:
    """The output directory, the JSON record, the clock and the environment of every step."""

    def __init__(self, out: Path, sizes: Sizes, budget_s: float, python: str):
        self.out, self.sizes, self.python = out, sizes, python
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + budget_s
        self.record = {"dry_run": sizes.dry, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "budget_s": budget_s, "targets": TARGETS, "steps": {}}

    def env(self, **extra) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        if self.sizes.dry:  # the dry run is a CPU run, whatever the machine has
            env.update({"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def sh(self, name: str, cmd: list, timeout: float, env: Optional[dict] = None,
           cwd: Optional[Path] = None) -> tuple[int, str]:
        """Run ``cmd``, output into logs/NAME.log; (exit code or 124 on timeout, stdout)."""
        log = self.logs / f"{name}.log"
        timeout = max(1.0, min(timeout, self.deadline - time.monotonic()))
        with open(log, "ab") as f:
            f.write(f"$ {' '.join(map(str, cmd))}\n".encode())
            f.flush()
            try:
                p = subprocess.run([str(c) for c in cmd], cwd=cwd or REPO, env=env or self.env(),
                                   stdout=subprocess.PIPE, stderr=f, timeout=timeout)
            except subprocess.TimeoutExpired as e:
                f.write(e.stdout or b"")
                return 124, (e.stdout or b"").decode(errors="replace")
            f.write(p.stdout)
        return p.returncode, p.stdout.decode(errors="replace")

    def save(self) -> None:
        path = self.out / "gpu_check.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.record, indent=1, default=str))
        os.replace(tmp, path)


class StepFailed(Exception):
    """A step's own verdict: recorded as failed with this message (and ``details``, if any)."""

    def __init__(self, message: str, details: Optional[dict] = None):
        super().__init__(message)
        self.details = details or {}


def step(run: Run, name: str, budget_s: float, fn: Callable[[Run, float], dict]) -> dict:
    """Run one step under its budget; record ok / failed / timeout / skipped and its details."""
    left = run.deadline - time.monotonic()
    if left < min(budget_s, 20.0):
        rec = {"status": "skipped", "reason": f"{left:.0f} s left of the run's budget"}
    else:
        t0 = time.monotonic()
        try:
            rec = {"status": "ok", **(fn(run, min(budget_s, left)) or {})}
        except subprocess.TimeoutExpired:
            rec = {"status": "timeout"}
        except StepFailed as e:
            rec = {"status": "timeout" if "timed out" in str(e) else "failed", "error": str(e), **e.details}
        except Exception as e:  # noqa: BLE001 - a broken step is recorded; the run goes on
            rec = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        rec.update(seconds=round(time.monotonic() - t0, 1), budget_s=budget_s)
    rec["log"] = str((run.logs / f"{name}.log").relative_to(run.out))
    run.record["steps"][name] = rec
    run.save()
    print(f"gpu_check: {name}: {rec['status']} ({rec.get('seconds', 0)} s)", file=sys.stderr, flush=True)
    return rec


def check_rc(rc: int, what: str, budget: float) -> None:
    if rc == 124:
        raise StepFailed(f"{what} timed out after {budget:.0f} s")
    if rc != 0:
        raise StepFailed(f"{what} exited {rc}")


def last_json(stdout: str) -> dict:
    """The last line of ``stdout`` that is a JSON object."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise StepFailed("no JSON object on stdout")


def plan(sizes: Sizes) -> list[tuple[str, float, Callable]]:
    """(name, budget in seconds, step) in the order they run; the budgets sum past the run's on purpose:
    what does not fit in the time left is skipped, the most important steps come first."""
    import gpu_check_steps as S

    steps: list[tuple[str, float, Callable]] = [
        ("environment", 60, S.environment), ("install", 90, S.install),
        ("deepspeed_wheels", 90, S.deepspeed_wheels), ("pytest_gpu", 200, S.pytest_gpu)]
    for b in sizes.quick_batches:
        steps += [(f"quick_b{b}", 60, S.bench(f"quick_b{b}", "cifar10_quick", b, False)),
                  (f"quick_b{b}_compile", 120, S.bench(f"quick_b{b}_compile", "cifar10_quick", b, True)),
                  (f"bare_quick_b{b}", 45, S.bare(f"bare_quick_b{b}", "cifar10_quick", b, False))]
    big = sizes.quick_batches[-1]
    steps += [(f"bare_quick_b{big}_compile", 120, S.bare(f"bare_quick_b{big}_compile", "cifar10_quick", big, True)),
              (f"quick_b{big}_augment", 60, S.bench(f"quick_b{big}_augment", "cifar10_quick", big, False, True))]
    for size in sizes.vgg_sizes:
        steps.append((f"vgg16_{size}", 90, S.bench(f"vgg16_{size}", "vgg16", sizes.vgg_batch, False, input_size=size)))
    size = sizes.vgg_sizes[-1]
    steps += [(f"bare_vgg16_{size}", 60, S.bare(f"bare_vgg16_{size}", "vgg16", sizes.vgg_batch, False, size)),
              ("convergence", 150, S.convergence),
              ("fsdp_probe", 120, S.fsdp_probe),
              ("fsdp_train", 120, S.launched_train("fsdp_train", "fsdp.yaml")),
              ("deepspeed_zero2_train", 150, S.launched_train("deepspeed_zero2_train", "deepspeed_zero2.yaml",
                                                              needs=("deepspeed", "transformers")))]
    return steps


def ratios(steps: dict) -> dict:
    """distrain's training img/s over the bare loop's at the same config, where both ran."""
    out = {}
    for name, rec in steps.items():
        ref = steps.get("bare_" + name, {})
        if rec.get("train_img_per_s") and ref.get("img_per_s"):
            out[name] = rec["train_img_per_s"] / ref["img_per_s"]
    return out


def _result(name: str, rec: dict, ratio: dict) -> tuple[str, str]:
    """(what was measured, the target and whether it was met) for one row of the table."""
    if rec.get("status") != "ok":
        return (rec.get("error") or rec.get("reason") or "")[:70], ""
    if name == "pytest_gpu":
        c = rec["counts"]
        return f"{c['passed']} passed, {c['failure'] + c['error']} failed, {c['skipped']} skipped", ""
    if "train_img_per_s" in rec:
        text = f"{rec['train_img_per_s']:,.0f} img/s, {rec['step_time_ms']:.2f} ms/step"
        if rec.get("mfu") is not None:
            text += f", MFU {100 * rec['mfu']:.1f}%"
        target = []
        if name.startswith("quick_"):
            ok = rec["train_img_per_s"] >= TARGETS["quick_img_per_s"]
            target.append(f">=150k img/s {'met' if ok else 'NOT met'}")
        if name.startswith("vgg16_224") and rec.get("mfu") is not None:
            target.append(f">=35% MFU {'met' if rec['mfu'] >= TARGETS['vgg16_224_mfu'] else 'NOT met'}")
        if name in ratio:
            met = "met" if ratio[name] >= TARGETS["step_vs_bare"] else "NOT met"
            target.append(f"{ratio[name]:.3f}x bare (>=0.95 {met})")
        return text, "; ".join(target)
    if "img_per_s" in rec:
        return f"{rec['img_per_s']:,.0f} img/s, {rec['step_time_ms']:.2f} ms/step", ""
    if name == "convergence":
        return (f"{'agree' if rec['agree'] else 'DISAGREE'}: max loss diff {rec['max_abs_loss_diff']:.4f} "
                f"({100 * rec['max_rel_loss_diff']:.1f}%), accuracy diff {rec['accuracy_diff']:.3f}"), ""
    if name == "environment":
        return f"{rec.get('device_name', 'CPU')}, torch {rec['torch']}, CUDA {rec['cuda']}", ""
    if "final_step" in rec:
        return f"step {rec['final_step']} (resumed), export loads strictly", ""
    return "", ""


def table(record: dict) -> str:
    steps, ratio = record["steps"], record.get("step_vs_bare", {})
    rows = [("step", "status", "seconds", "result", "target")]
    for name, rec in steps.items():
        rows.append((name, rec["status"], str(rec.get("seconds", "")), *_result(name, rec, ratio)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    head = f"distrain GPU check{' (DRY RUN on the CPU: the numbers mean nothing)' if record['dry_run'] else ''}"
    return "\n".join([head, *lines])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default=None, help="output directory (default benchmarks/results/gpu-check-DATE)")
    p.add_argument("--dry", action="store_true", default=os.environ.get("GPU_CHECK_DRY") == "1")
    p.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", 0) or 0))
    p.add_argument("--only", action="append", default=[], help="run only these steps (repeatable)")
    args = p.parse_args(argv)
    sizes = Sizes.make(args.dry)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = Path(args.out or REPO / "benchmarks" / "results" / f"gpu-check-{'dry-' if args.dry else ''}{stamp}")
    run = Run(out.resolve(), sizes, args.budget or (900 if args.dry else 530),
              os.environ.get("GPU_CHECK_PYTHON", sys.executable))
    for name, budget, fn in plan(sizes):
        if not args.only or name in args.only:
            step(run, name, budget * sizes.budget_scale, fn)
    run.record["step_vs_bare"] = ratios(run.record["steps"])
    run.record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    run.save()
    text = table(run.record)
    (out / "gpu_check.txt").write_text(text + "\n")
    print(f"gpu_check: JSON in {out / 'gpu_check.json'}, logs in {run.logs}", file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    # One copy of this module for the steps too (they import it as gpu_check): its StepFailed is theirs.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_check

    sys.exit(gpu_check.main())
