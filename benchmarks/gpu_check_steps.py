"""The steps of the GPU acceptance run (benchmarks/gpu_check.py runs them in this order).

Each step is ``fn(run, budget_s) -> dict`` (the details recorded for it); it raises `StepFailed` with a
message for a failure and returns ``{"status": "skipped", "reason": ...}`` when it cannot apply.
Every measurement is a subprocess of the python under test: ``distrain bench --json``,
benchmarks/bare_loop.py, ``distrain train`` and ``accelerate launch``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from gpu_check import REPO, Run, StepFailed, check_rc, last_json

# Convergence: bf16 and fp32 agree when every epoch's training loss is within REL x the fp32 loss plus
# ABS, the final eval accuracies within ACC, and both runs learned (last epoch's loss < first's).
AGREE_REL, AGREE_ABS, AGREE_ACC = 0.10, 0.02, 0.05

_ENV_CODE = r"""
import json, platform, torch
d = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
     "cuda_available": torch.cuda.is_available(), "cudnn": torch.backends.cudnn.version()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    d.update(device_name=p.name, device_count=torch.cuda.device_count(), capability=f"{p.major}.{p.minor}",
             memory_gib=round(p.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
from importlib import metadata  # versions without importing (DeepSpeed's import probes for seconds)
for m in ("torchvision", "accelerate", "deepspeed", "transformers", "timm", "safetensors", "pytest",
          "tensorboard", "distrain"):
    try:
        d[m] = metadata.version(m)
    except metadata.PackageNotFoundError:
        d[m] = None
print(json.dumps(d))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(run: Run, budget: float) -> dict:
    rc, out = run.sh("environment", [run.python, "-c", _ENV_CODE], budget)
    check_rc(rc, "the environment probe", budget)
    info = last_json(out)
    if not run.sizes.dry and not info.get("cuda_available"):
        raise StepFailed("no CUDA GPU visible (run with GPU_CHECK_DRY=1 on a CPU)")
    run.record["machine"] = info
    return info


def install(run: Run, budget: float) -> dict:
    """distrain itself, editable, without touching what is installed (no deps, no index)."""
    cmd = [run.python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation", "-e", "."]
    if run.sizes.dry:
        cmd.append("--dry-run")  # the dry run checks the command, it must not re-point the venv
    rc, _ = run.sh("install", cmd, budget)
    check_rc(rc, "pip install -e .", budget)
    return {"command": " ".join(map(str, cmd[1:]))}


def wheels_dir() -> Path:
    return Path(os.environ.get("GPU_CHECK_WHEELS", REPO / ".gpu-wheels"))


def deepspeed_wheels(run: Run, budget: float) -> dict:
    """DeepSpeed (and transformers, which Accelerate's DeepSpeed path imports) from a carried wheelhouse."""
    d = wheels_dir()
    wheels = sorted(p.name for p in d.glob("*.whl")) if d.is_dir() else []
    if not wheels:
        return {"status": "skipped", "reason": f"no wheelhouse at {d} (benchmarks/gpu_wheelhouse.sh builds it)"}
    cmd = [run.python, "-m", "pip", "install", "--no-index", "--find-links", str(d), "deepspeed", "transformers"]
    if run.sizes.dry:
        cmd.append("--dry-run")
    rc, _ = run.sh("deepspeed_wheels", cmd, budget)
    check_rc(rc, "pip install deepspeed transformers from the wheelhouse", budget)
    return {"wheels": len(wheels), "wheelhouse": str(d)}


def _junit(path: Path) -> dict:
    suites = ET.parse(path).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    tests = []
    for case in suite.iter("testcase"):
        outcome, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome, msg = tag, (el.get("message") or "").splitlines()[0][:200] if el.get("message") else ""
        tests.append({"test": case.get("name"), "outcome": outcome, "message": msg})
    count = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failure", "error", "skipped")}
    return {"counts": count, "tests": tests}


def pytest_gpu(run: Run, budget: float) -> dict:
    """`pytest -m gpu` over the test modules that mark tests for CUDA."""
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                   if "mark.gpu" in p.read_text())
    if not files:
        raise StepFailed("no test module marks tests with pytest.mark.gpu")
    xml = run.out / "pytest_gpu.xml"
    cmd = [run.python, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", "-o", "addopts=",
           f"--junitxml={xml}", *files]
    rc, _ = run.sh("pytest_gpu", cmd, budget)
    if rc == 124:
        raise StepFailed(f"pytest -m gpu timed out after {budget:.0f} s")
    if not xml.exists():
        raise StepFailed(f"pytest -m gpu exited {rc} without a report")
    res = {"files": files, **_junit(xml)}
    bad = res["counts"]["failure"] + res["counts"]["error"]
    if rc not in (0, 5) or bad:
        raise StepFailed(f"pytest -m gpu: {bad} failed, {res['counts']['passed']} passed (exit {rc}); "
                         + "; ".join(f"{t['test']}: {t['message']}" for t in res["tests"]
                                     if t["outcome"] in ("failure", "error"))[:1500], res)
    return res


# -- throughput ---------------------------------------------------------------------------------

def _device_args(run: Run) -> list[str]:
    return ["train.device=cpu"] if run.sizes.dry else ["train.device=cuda"]


def bench(label: str, model: str, batch: int, compile_: bool, augment: bool = False, input_size: int = 32):
    """A step: `distrain bench --json` for one config (bf16, channels_last, synthetic data)."""

    def fn(run: Run, budget: float) -> dict:
        s = run.sizes
        compiled = compile_ and not s.dry
        cmd = [run.python, "-m", "distrain", "bench", "--json", "--steps", s.bench_steps, "--warmup",
               s.bench_warmup, f"output_dir={run.out / 'bench-output-never-written' / label}",
               "data.name=synthetic", f"data.max_train_samples={s.train_samples}", "data.max_test_samples=16",
               f"data.augment={str(augment).lower()}", f"model.name={model}", f"model.input_size={input_size}",
               f"train.batch_size={batch}", "train.mixed_precision=bf16", "model.channels_last=true",
               f"model.compile={str(compiled).lower()}", *_device_args(run)]
        rc, out = run.sh(label, cmd, budget)
        check_rc(rc, "distrain bench", budget)
        r = last_json(out)
        keep = ("model", "batch_size", "precision", "channels_last", "compile", "augment", "device_name",
                "data_img_per_s", "train_img_per_s", "step_time_ms", "achieved_tflops", "peak_bf16_tflops", "mfu")
        rec = {k: r.get(k) for k in keep}
        rec["input_size"] = input_size
        if compile_ and not compiled:
            rec["dry_note"] = "compile off in the dry run (CPU inductor takes about a minute per config)"
        return rec

    return fn


def bare(label: str, model: str, batch: int, compile_: bool, input_size: int = 32):
    """A step: benchmarks/bare_loop.py at the config of the distrain bench it is compared with."""

    def fn(run: Run, budget: float) -> dict:
        s = run.sizes
        cmd = [run.python, REPO / "benchmarks" / "bare_loop.py", "--json", "--model", model, "--batch-size", batch,
               "--input-size", input_size, "--precision", "bf16", "--channels-last", "--steps", s.bench_steps,
               "--warmup", s.bench_warmup, "--samples", min(s.train_samples, 8192),
               "--device", "cpu" if s.dry else "cuda"]
        if compile_ and not s.dry:
            cmd.append("--compile")
        rc, out = run.sh(label, cmd, budget)
        check_rc(rc, "bare_loop.py", budget)
        r = last_json(out)
        return {k: r.get(k) for k in ("img_per_s", "step_time_ms", "batch_size", "compile", "device_name")}

    return fn


# -- convergence --------------------------------------------------------------------------------

def _epochs(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == kind]


def _train_args(out: Path, samples: int, batch: int, epochs: int, precision: str) -> list[str]:
    return [f"output_dir={out}", "data.name=synthetic", f"data.max_train_samples={samples}",
            "data.max_test_samples=1000", "data.augment=false", f"train.batch_size={batch}",
            f"train.epochs={epochs}", f"train.mixed_precision={precision}", "train.seed=0",
            "log.tensorboard=false", "log.progress=none", "checkpoint.keep_last=1"]


def agreement(fp32: list[float], bf16: list[float], acc32: float, acc16: float) -> dict:
    """Whether two loss curves (per epoch) and final accuracies agree (AGREE_REL / _ABS / _ACC)."""
    diffs = [abs(a - b) for a, b in zip(fp32, bf16)]
    within = all(d <= AGREE_REL * a + AGREE_ABS for d, a in zip(diffs, fp32))
    learned = fp32[-1] < fp32[0] and bf16[-1] < bf16[0]
    return {"agree": bool(within and learned and abs(acc32 - acc16) <= AGREE_ACC and len(fp32) == len(bf16)),
            "max_abs_loss_diff": max(diffs), "max_rel_loss_diff": max(d / a for d, a in zip(diffs, fp32)),
            "accuracy_diff": abs(acc32 - acc16), "both_learned": learned,
            "rule": f"every epoch |bf16 - fp32| <= {AGREE_REL} x fp32 + {AGREE_ABS}, final accuracies within "
                    f"{AGREE_ACC}, both losses lower at the end than after the first epoch"}


def convergence(run: Run, budget: float) -> dict:
    """fp32 and bf16 from the same seed on CIFAR-shaped synthetic data: the loss curves agree."""
    s, curves = run.sizes, {}
    for prec in ("no", "bf16"):
        out = run.out / "convergence" / ("fp32" if prec == "no" else prec)
        args = _train_args(out, s.conv_samples, s.conv_batch, s.conv_epochs, prec)
        rc, _ = run.sh("convergence", [run.python, "-m", "distrain", "train", *args, *_device_args(run)],
                       budget / 2)
        check_rc(rc, f"distrain train ({prec})", budget / 2)
        trains, evals = _epochs(out, "train"), _epochs(out, "eval")
        curves[prec] = {"loss": [r["loss"] for r in trains], "train_accuracy": [r["accuracy"] for r in trains],
                        "eval_accuracy": [r["accuracy"] for r in evals], "steps": trains[-1]["step"]}
    a, b = curves["no"], curves["bf16"]
    return {"fp32": a, "bf16": b, **agreement(a["loss"], b["loss"], a["eval_accuracy"][-1], b["eval_accuracy"][-1])}


# -- sharded strategies on one process ------------------------------------------------------------

_STRICT_LOAD = ("import sys; from safetensors.torch import load_file; from distrain.models import build_model; "
                "build_model(sys.argv[2]).load_state_dict(load_file(sys.argv[1]), strict=True); print('{}')")


def launched_train(name: str, config: str, model: str = "cifar10_quick", needs=()):
    """A step: train 4 steps under `accelerate launch --config_file CONFIG` with one process, resume to 6,
    export; the export loads strictly into the unsharded model."""

    def fn(run: Run, budget: float) -> dict:
        missing = _missing(run, needs)
        if missing:
            return {"status": "skipped", "reason": f"{', '.join(missing)} not importable"}
        out = run.out / name
        launch = [run.python, "-m", "accelerate.commands.launch", "--config_file", REPO / "launch" / config,
                  "--num_processes", "1", "--main_process_port", str(free_port()), "-m", "distrain", "train"]
        base = [*_train_args(out, 256, 32, 1, "bf16"), f"model.name={model}", *_device_args(run)]
        for steps in (4, 6):
            rc, _ = run.sh(name, [*launch, *base, f"train.max_steps={steps}"], budget / 3)
            check_rc(rc, f"accelerate launch ({config}) to step {steps}", budget / 3)
        log = (run.logs / f"{name}.log").read_text(errors="replace")
        if "resumed from" not in log:
            raise StepFailed("the second run did not resume from the first one's checkpoint")
        rc, _ = run.sh(name, [run.python, "-c", _STRICT_LOAD, out / "model.safetensors", model], budget / 3)
        check_rc(rc, "strict load of the export into the unsharded model", budget / 3)
        trains = _epochs(out, "train")
        return {"final_step": trains[-1]["step"], "loss": trains[-1]["loss"],
                "peak_mem_gib": trains[-1].get("peak_mem_gib"), "resumed": True, "export_strict_load": True}

    return fn


def _missing(run: Run, modules) -> list[str]:
    missing = []
    for m in modules:
        rc, _ = run.sh("imports", [run.python, "-c", f"import {m}"], 60)
        if rc != 0:
            missing.append(m)
    return missing


def fsdp_probe(run: Run, budget: float) -> dict:
    """benchmarks/fsdp_probe.py on one process: torch's fully_shard on this device, step by step."""
    cmd = [run.python, "-m", "accelerate.commands.launch", "--config_file", REPO / "launch" / "fsdp.yaml",
           "--num_processes", "1", "--main_process_port", str(free_port()),
           REPO / "benchmarks" / "fsdp_probe.py", "torch"]
    rc, out = run.sh("fsdp_probe", cmd, budget, env=run.env(FSDP_PROBE_COMPILE=0 if run.sizes.dry else 1))
    check_rc(rc, "fsdp_probe.py", budget)
    rep = last_json(out)
    # channels_last parameters are a documented FSDP2 limitation (distrain refuses the combination).
    failed = [k for k, v in rep.items() if isinstance(v, dict) and v.get("ok") is False and k != "channels_last"]
    if failed:
        raise StepFailed(f"fsdp_probe: {', '.join(failed)} failed", rep)
    return rep
