"""Careless and unlucky runs, for real (processes, signals, files): two runs on one directory, a
diverging loss, a fresh start over an old run, unwritable outputs, a bad image met mid-training on one
rank, a broken eval path found before the first step, file modes under the umask."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import distrain_cmd, metrics_events, run_distrain, smoke_args, subprocess_env
from fakes import write_image_folder
from test_errors import assert_user_error_on_every_rank

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors, proc.stderr[-3000:]
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def _slow_run_args(out: Path, **over) -> list[str]:
    # A small lr: CIFAR10-quick (no activations) diverges at batch 8 with the default one.
    base = {"data.max_train_samples": 2048, "train.epochs": 50, "train.batch_size": 8,
            "checkpoint.every_steps": 20, "log.progress": "none", "train.lr": 0.001}
    base.update(over)
    return ["train", *smoke_args(out, **base)]


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(distrain_cmd(args), env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(pred, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run exited {proc.returncode} before {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"no {what} within {timeout} s")


def test_a_second_run_on_a_busy_directory_exits_2_naming_it_and_a_killed_one_does_not_block(tmp_path):
    out = tmp_path / "run"
    first = _start(_slow_run_args(out))
    try:
        _wait_for(lambda: metrics_events(out, "checkpoint"), first, "a first checkpoint")
        assert first.poll() is None
        second = run_distrain(["train", *smoke_args(out, **{"train.seed": 7})])
        line = _one_line_error(second, "output_dir", str(out), "in use by", f"pid {first.pid}")
        assert "wait for it to finish" in line
        assert first.poll() is None  # the first run goes on, untouched
        ckpts_before = sorted(p.name for p in (out / "checkpoints").glob("ckpt-*"))
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert ckpts_before
    # A crash leaves no stale lock: the next run takes the directory and resumes.
    again = run_distrain(_slow_run_args(out, **{"train.epochs": 1}))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr


def test_divergence_stops_with_exit_2_naming_train_lr_and_writes_nothing_non_finite(tmp_path):
    out = tmp_path / "run"
    args = ["train", *smoke_args(out, **{"train.lr": 1e6, "train.epochs": 3, "checkpoint.every_steps": 2,
                                         "train.scheduler": "none"})]
    proc = run_distrain(args)
    _one_line_error(proc, "diverged", "train.lr", "step")
    assert not (out / "model.safetensors").exists()
    from safetensors.torch import load_file

    import torch

    for ckpt in (out / "checkpoints").glob("ckpt-*"):
        sd = load_file(str(ckpt / "model.safetensors"))
        assert all(bool(torch.isfinite(v).all()) for v in sd.values()), ckpt
    assert metrics_events(out, "diverged")


def test_divergence_stops_every_rank_the_same_way(tmp_path):
    out = tmp_path / "run"
    proc = run_distrain(["train", *smoke_args(out, **{"train.lr": 1e6, "train.batch_size": 16})],
                        nprocs=2)
    assert_user_error_on_every_rank(proc, "train", "training diverged", "train.lr")


def test_resume_none_moves_the_earlier_run_aside(tmp_path):
    out = tmp_path / "run"
    run_distrain(["train", *smoke_args(out)], check=True)
    old_best = (out / "checkpoints" / "best").read_text()
    proc = run_distrain(["train", *smoke_args(out, **{"resume": "none", "train.seed": 3})], check=True)
    assert "was moved to" in proc.stderr
    (aside,) = [p for p in out.iterdir() if p.name.startswith("replaced-")]
    assert (aside / "checkpoints" / "best").read_text() == old_best  # nothing of the old run lost
    starts = metrics_events(out, "start")
    assert len(starts) == 1  # metrics.jsonl holds only the new run
    cfg = (out / "config.yaml").read_text()
    assert "seed: 3" in cfg


@pytest.mark.parametrize("culprit", ["metrics.jsonl", "model.json", "tb", "checkpoints"])
def test_unwritable_outputs_are_found_before_training(tmp_path, culprit):
    out = tmp_path / "run"
    out.mkdir()
    if culprit in ("tb", "checkpoints"):
        (out / culprit).write_text("a file where a directory belongs")
    else:
        (out / culprit).mkdir()
    proc = run_distrain(["train", *smoke_args(out, **{"log.tensorboard": "true"})])
    _one_line_error(proc, culprit)
    assert not list(out.glob("checkpoints/ckpt-*"))  # not a single epoch was trained first


def _folder_args(out: Path, root: Path) -> list[str]:
    """A 2-class image-folder run whose files are read only as training meets them."""
    return ["train", *smoke_args(out, **{"data.name": "imagefolder", "data.root": root,
                                         "model.num_classes": 2, "data.verify": "false",
                                         "data.max_train_samples": "null",
                                         "data.max_test_samples": "null", "train.batch_size": 4,
                                         "data.num_workers": 0})]


def test_a_bad_image_met_mid_training_fails_every_rank_alike(tmp_path):
    root = write_image_folder(tmp_path / "photos", classes=("a", "b"), per_class_train=12, per_class_val=2)
    bad = sorted((root / "train" / "b").iterdir())[-1]
    bad.write_bytes(b"not an image at all")
    out = tmp_path / "run"
    args = _folder_args(out, root)
    proc = run_distrain(args, nprocs=2)
    assert_user_error_on_every_rank(proc, "train", str(bad))
    lines = [line for line in proc.stderr.splitlines() if line.startswith("[rank ")]
    assert len({line.split("] ", 1)[1] for line in lines}) == 1  # the same message on both ranks


def test_a_broken_test_split_fails_before_the_first_step(tmp_path):
    root = write_image_folder(tmp_path / "photos", classes=("a", "b"), per_class_train=4, per_class_val=2)
    for f in (root / "val" / "a").iterdir():
        f.write_bytes(b"broken")
    out = tmp_path / "run"
    args = _folder_args(out, root)
    proc = run_distrain(args)
    _one_line_error(proc, str(root / "val" / "a"))
    assert not metrics_events(out, "train") and not list((out / "checkpoints").glob("ckpt-*"))


def test_outputs_get_the_umask_modes(tmp_path):
    out = tmp_path / "run"
    env = subprocess_env()
    proc = subprocess.run(["bash", "-c", 'umask 022 && exec "$@"', "-", *distrain_cmd(
        ["train", *smoke_args(out)])], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for f in (out / "model.safetensors", out / "model.json", out / "config.yaml",
              out / "checkpoints" / "latest"):
        assert (f.stat().st_mode & 0o777) == 0o644, (f, oct(f.stat().st_mode))
    info = json.loads((out / "model.json").read_text())
    assert info["architecture"] == "cifar10_quick"
