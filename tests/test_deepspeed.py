"""DeepSpeed ZeRO-2 through Accelerate (launch/deepspeed_zero2.yaml) on CPU processes.

The engine keeps its own gradient accumulation and loss scaling under DeepSpeed (DeepSpeed's batch keys are
set from the run config, its loss division is turned off), so the weights must match plain training. ZeRO
partitions the optimizer state: checkpoints keep each rank's partition in its rank files and resume with
the same number of processes; model.safetensors and the export stay plain state_dicts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from conftest import (REPO, free_port, load_weights, read_jsonl, run_distrain, smoke_args,
                      subprocess_env, traceback_of_ours)

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")  # Accelerate's DeepSpeed path imports it

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

CONFIG = REPO / "launch" / "deepspeed_zero2.yaml"


def deepspeed_cmd(args: list[str], nprocs: int = 1) -> list[str]:
    """`accelerate launch --config_file launch/deepspeed_zero2.yaml --num_processes N -m distrain ARGS`."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--num_processes",
            str(nprocs), "--main_process_port", str(free_port()), "-m", "distrain", *args]


def run_deepspeed(args: list[str], nprocs: int = 1, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    env = subprocess_env(DS_ACCELERATOR="cpu")
    p = subprocess.run(deepspeed_cmd(args, nprocs), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"deepspeed run exited {p.returncode}\n{p.stderr[-6000:]}")
    return p


def _diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _latest(out: Path) -> Path:
    return out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()


def test_vgg16_zero2_one_cpu_process_trains_checkpoints_resumes_exports(tmp_path) -> None:
    out = tmp_path / "run"
    base = {"model.name": "vgg16", "data.max_train_samples": 64, "data.max_test_samples": 32, "train.batch_size": 16,
            "train.scheduler": "none", "log.every_steps": 1, "log.progress": "none"}
    p = run_deepspeed(["train", *smoke_args(out, **base, **{"train.max_steps": 2})])
    assert "Traceback" not in p.stderr
    ckpt = _latest(out)
    assert ckpt.name.endswith("step00000002")
    # The optimizer state is ZeRO's partition, kept in the rank file: momentum for every parameter.
    n_params = sum(v.numel() for v in load_weights(ckpt / "model.safetensors").values())
    assert sum(v.numel() for v in load_weights(ckpt / "rank-00000.safetensors").values()) >= n_params
    assert sum(v.numel() for v in load_weights(ckpt / "optimizer.safetensors").values()) < 1000

    p = run_deepspeed(["train", *smoke_args(out, **base, **{"train.max_steps": 3})])
    assert "resumed from" in p.stderr and "step00000002" in p.stderr
    trains = [m for m in read_jsonl(out / "metrics.jsonl") if m["event"] == "train"]
    assert trains[-1]["step"] == 3
    sd = load_weights(out / "model.safetensors")
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in sd)
    assert all(v.dtype == torch.float32 for v in sd.values())
    torchvision.models.vgg16(num_classes=10).load_state_dict(sd, strict=True)
    assert _diff(sd, load_weights(ckpt / "model.safetensors")) > 0  # the resumed step changed the weights


def test_zero2_matches_plain_training_and_resumes_exactly(tmp_path) -> None:
    """One process, 2 micro-batches per step, clipping: DeepSpeed == plain; stopped + resumed == uninterrupted."""
    common = {"train.grad_accum_steps": 2, "train.batch_size": 8, "train.grad_clip": 1.0, "train.scheduler": "none",
              "train.epochs": 2, "data.max_train_samples": 96, "log.progress": "none"}
    plain = tmp_path / "plain"
    run_distrain(["train", *smoke_args(plain, **common)], check=True)
    ds = tmp_path / "ds"
    run_deepspeed(["train", *smoke_args(ds, **common, **{"train.max_steps": 8})])
    p = run_deepspeed(["train", *smoke_args(ds, **common)])
    assert "resumed from" in p.stderr
    assert _diff(load_weights(plain / "model.safetensors"), load_weights(ds / "model.safetensors")) < 1e-5


def test_zero2_two_cpu_processes_and_wrong_resumes(tmp_path) -> None:
    """2 processes (gloo): stopped and resumed, equal to 1 plain process with the same global batch."""
    common = {"train.grad_accum_steps": 2, "train.scheduler": "none", "train.epochs": 2,
              "data.max_train_samples": 96, "data.augment": "false", "log.progress": "none"}
    plain = tmp_path / "plain"
    run_distrain(["train", *smoke_args(plain, **common, **{"train.batch_size": 8})], check=True)
    ds = tmp_path / "ds"
    run_deepspeed(["train", *smoke_args(ds, **common, **{"train.batch_size": 4, "train.max_steps": 8})], nprocs=2)
    p = run_deepspeed(["train", *smoke_args(ds, **common, **{"train.batch_size": 4})], nprocs=2)
    assert "resumed from" in p.stderr
    assert _diff(load_weights(plain / "model.safetensors"), load_weights(ds / "model.safetensors")) < 1e-5
    assert sorted(f.name for f in _latest(ds).glob("rank-*.safetensors")) == ["rank-00000.safetensors",
                                                                              "rank-00001.safetensors"]

    # The partitions of 2 processes do not resume on 1, nor without DeepSpeed: exit 2, saying how.
    p = run_deepspeed(["train", *smoke_args(ds, **common, **{"train.batch_size": 8})], check=False)
    assert p.returncode != 0 and "resume it with 2 processes" in p.stderr
    assert not traceback_of_ours(p.stderr), p.stderr[-3000:]  # no traceback of ours
    p = run_distrain(["train", *smoke_args(ds, **common, **{"train.batch_size": 4})], nprocs=2)
    assert p.returncode != 0 and "written under DeepSpeed" in p.stderr
