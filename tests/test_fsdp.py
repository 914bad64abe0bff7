"""FSDP2 (launch/fsdp.yaml) on 2 CPU processes over gloo: the same promises as DDP.

distrain shards the model itself with torch's fully_shard (Accelerate 1.15 starts its FSDP only on GPU
backends). Parameters, gradients and optimizer state are sharded; checkpoints keep each rank's model and
optimizer shards in its rank files (tensors + layout as JSON, no pickle) and resume with the same number
of processes; model.safetensors (checkpoint and export) is the full, unsharded state_dict.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (REPO, free_port, load_weights, max_abs_diff, metrics_events, run_distrain,
                      smoke_args, subprocess_env, traceback_of_ours)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CONFIG = REPO / "launch" / "fsdp.yaml"
# 513 test images: rank 0 gets 257 (two eval batches of at most 256), rank 1 256 (one): the ranks run
# different numbers of eval batches, which FSDP's collective forward passes must survive.
COMMON = {"data.augment": "false", "train.scheduler": "none", "train.grad_accum_steps": 2,
          "train.grad_clip": 1.0, "data.max_train_samples": 96, "data.max_test_samples": 513,
          "train.epochs": 2, "log.progress": "none", "train.optimizer": "sgd"}


def fsdp(args: list[str], nprocs: int = 2, check: bool = True, launch: tuple = ()) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file launch/fsdp.yaml --num_processes N [LAUNCH] -m distrain ARGS`."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--num_processes",
           str(nprocs), "--main_process_port", str(free_port()), *launch, "-m", "distrain", *args]
    p = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    if check and p.returncode != 0:
        raise AssertionError(f"FSDP run exited {p.returncode}\n{p.stderr[-6000:]}")
    return p


def _latest(out: Path) -> Path:
    return out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()


def test_fsdp_matches_ddp_checkpoints_resumes_exactly_and_exports(tmp_path) -> None:
    ddp, straight, resumed = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "resumed"
    run_distrain(["train", *smoke_args(ddp, **COMMON, **{"train.batch_size": 4})], nprocs=2, check=True)
    fsdp(["train", *smoke_args(straight, **COMMON, **{"train.batch_size": 4})])
    fsdp(["train", *smoke_args(resumed, **COMMON, **{"train.batch_size": 4, "train.max_steps": 9})])
    p = fsdp(["train", *smoke_args(resumed, **COMMON, **{"train.batch_size": 4})])
    assert "resumed from" in p.stderr and "step00000009" in p.stderr

    final = {name: load_weights(d / "model.safetensors") for name, d in
             (("ddp", ddp), ("fsdp", straight), ("resumed", resumed))}
    assert max_abs_diff(final["fsdp"], final["ddp"]) < 1e-4  # same global batch, same images per step
    assert max_abs_diff(final["resumed"], final["fsdp"]) == 0.0  # the shards resume exactly
    from distrain.models import build_model

    build_model("cifar10_quick", num_classes=10).load_state_dict(final["resumed"], strict=True)
    assert all(v.dtype == torch.float32 for v in final["resumed"].values())
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in final["resumed"])

    for d in (straight, resumed):
        last_per_epoch = {e["epoch"]: e["samples"] for e in metrics_events(d, "train")}
        assert last_per_epoch == {0: 96, 1: 96}  # each image once per epoch (the resumed one too)
        assert {e["samples"] for e in metrics_events(d, "eval")} == {513}  # each test image once
    ckpt = _latest(resumed)
    shards = [load_weights(ckpt / f"rank-0000{r}.safetensors") for r in (0, 1)]
    n_params = sum(v.numel() for v in final["resumed"].values())
    # Each rank's file holds its half of the weights and of the momentum (SGD): about n_params each.
    for s in shards:
        assert 0.8 * n_params < sum(v.numel() for v in s.values()) < 1.3 * n_params
    ev = run_distrain(["eval", "--checkpoint", str(ckpt), "--json"], check=True)  # one plain process
    assert '"samples": 513' in ev.stdout


def test_fsdp_freeze_then_unfreeze_matches_ddp(tmp_path) -> None:
    over = {**COMMON, "train.batch_size": 4, "model.freeze_features": "true", "model.unfreeze_after_epochs": 1,
            "data.max_test_samples": 64}
    ddp, sharded = tmp_path / "ddp", tmp_path / "fsdp"
    run_distrain(["train", *smoke_args(ddp, **over)], nprocs=2, check=True)
    p = fsdp(["train", *smoke_args(sharded, **over)])
    assert "backbone unfrozen" in p.stderr
    assert max_abs_diff(load_weights(ddp / "model.safetensors"), load_weights(sharded / "model.safetensors")) < 1e-4


def test_fsdp_refuses_what_it_cannot_do_with_exit_2(tmp_path) -> None:
    out = tmp_path / "run"
    base = {**COMMON, "train.batch_size": 4, "data.max_test_samples": 64, "train.max_steps": 2}
    fsdp(["train", *smoke_args(out, **base)])
    ckpt = _latest(out)
    files = {f.name: f.read_bytes() for f in ckpt.iterdir()}
    more = {**base, "train.max_steps": 4}
    cases = [  # (the launcher's result, its number of workers, what the one-line error names)
        (fsdp(["train", *smoke_args(out, **{**more, "train.batch_size": 8})], nprocs=1,
              check=False), 1, "resume it with 2 processes"),
        (run_distrain(["train", *smoke_args(out, **more)], nprocs=2), 2, "written under FSDP"),
        (fsdp(["train", *smoke_args(tmp_path / "cl", **base, **{"model.channels_last": "true"})],
              check=False), 2, "model.channels_last"),
        (fsdp(["train", *smoke_args(tmp_path / "v1", **base)], check=False,
              launch=("--fsdp_version", "1")), 2, "fsdp_version"),
    ]
    for p, workers, words in cases:
        # `accelerate launch` exits 1 when its workers exit 2 (README); each worker exited 2.
        assert p.returncode == 1 and words in p.stderr, (p.returncode, p.stderr[-3000:])
        assert len(re.findall(r"^\s*exitcode\s*:\s*2\b", p.stderr, re.M)) == workers, p.stderr[-3000:]
        errors = re.findall(r"^(?:\[rank \d\] )?distrain train: error: .*$", p.stderr, re.M)
        assert len(errors) == workers and all(words in e for e in errors), p.stderr[-3000:]
        assert not traceback_of_ours(p.stderr), p.stderr[-3000:]
    # The refused resumes left the checkpoint as it was.
    assert _latest(out) == ckpt and {f.name: f.read_bytes() for f in ckpt.iterdir()} == files
