"""A resumed run with a changed config, through real `distrain train` processes (issue 11).

A new lr is honoured (the optimizer's parameter groups, the logged lr, config.yaml and the new
checkpoint all say the new value); another train.seed is refused from a mid-epoch checkpoint and
honoured at an epoch boundary; the largest seed trains, checkpoints mid-epoch and resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import metrics_events, run_distrain, smoke_args
from test_errors import assert_user_error

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def newest_checkpoint(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def optimizer_groups(ckpt: Path) -> list[dict]:
    from safetensors.torch import load_file

    from distrain.ckpt_format import decode

    meta = json.loads((ckpt / "state.json").read_text())
    return decode(meta["optimizer"], load_file(str(ckpt / "optimizer.safetensors")))["param_groups"]


def test_a_resume_with_another_lr_trains_with_it(tmp_path):
    run = tmp_path / "run"
    args = smoke_args(run, **{"train.scheduler": "none", "train.momentum": 0.9})
    run_distrain(["train", *args, "train.lr=0.01"], check=True)
    assert [g["lr"] for g in optimizer_groups(newest_checkpoint(run))] == [0.01] * 4
    proc = run_distrain(["train", *args, "train.lr=0.05", "train.momentum=0.5", "train.epochs=2"],
                        check=True)
    assert ("warning: 'train.lr' changes from 0.01 to 0.05, applied from the resume step on"
            in proc.stderr)
    assert "warning: 'train.momentum' changes from 0.9 to 0.5" in proc.stderr
    epochs = metrics_events(run, "train")
    assert [(e["epoch"], e["lr"]) for e in epochs] == [(0, 0.01), (1, 0.05)]
    groups = optimizer_groups(newest_checkpoint(run))  # what the optimizer stepped with in epoch 2
    assert [(g["lr"], g["momentum"]) for g in groups] == [(0.05, 0.5)] * 4
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 0.05
    meta = json.loads((newest_checkpoint(run) / "state.json").read_text())
    assert meta["config"]["train"]["lr"] == 0.05 and meta["train_state"]["epoch"] == 2


def test_another_seed_is_refused_mid_epoch_and_honoured_at_an_epoch_boundary(tmp_path):
    run = tmp_path / "mid"
    # Stops at step 3 of the first epoch's 8.
    run_distrain(["train", *smoke_args(run, **{"train.max_steps": 3})], check=True)
    # (The run lock names its latest holder: rewritten by each start, the only file that changes.)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    for over in ({"train.seed": 5}, {"data.max_train_samples": 200}):
        proc = run_distrain(["train", *smoke_args(run, **{"train.max_steps": "null", **over})])
        key = next(iter(over))
        assert_user_error(proc, "train", f"config key '{key}'", "middle of an epoch", "resume=none",
                          str(newest_checkpoint(run)))
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # nothing touched

    run = tmp_path / "boundary"
    run_distrain(["train", *smoke_args(run)], check=True)  # one whole epoch: saved at its end
    proc = run_distrain(["train", *smoke_args(run, **{"train.seed": 5, "train.epochs": 2})],
                        check=True)
    assert ("warning: 'train.seed' changes from 0 to 5, honoured from the resume step on"
            in proc.stderr)
    assert [e["epoch"] for e in metrics_events(run, "train")] == [0, 1]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == 5


def test_refused_optimizer_change_names_the_key(tmp_path):
    run = tmp_path / "run"
    run_distrain(["train", *smoke_args(run)], check=True)
    proc = run_distrain(["train", *smoke_args(run, **{"train.optimizer": "adamw",
                                                      "train.epochs": 2})])
    assert_user_error(proc, "train", "config key 'train.optimizer' changes from 'sgd' to 'adamw'",
                      "resume=none")
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["optimizer"] == "sgd"


def test_the_largest_seed_trains_checkpoints_mid_epoch_and_resumes(tmp_path):
    run = tmp_path / "run"
    top = {"train.seed": 2**32 - 1, "train.epochs": 2, "data.max_train_samples": 200}
    # Stopped mid-epoch 2 (7 steps per epoch), with augmentation on, through the DataLoader path.
    loader = {"data.loader": "dataloader", "data.num_workers": 1}
    run_distrain(["train", *smoke_args(run, **top, **loader, **{"train.max_steps": 10})],
                 check=True)
    assert newest_checkpoint(run).name.endswith("step00000010")
    proc = run_distrain(["train", *smoke_args(run, **top, **loader)], check=True)
    assert "resumed from" in proc.stderr and "Traceback" not in proc.stderr
    meta = json.loads((newest_checkpoint(run) / "state.json").read_text())
    assert meta["train_state"]["global_step"] == 14
    proc = run_distrain(["train", *smoke_args(tmp_path / "over", **{"train.seed": 2**32})])
    assert_user_error(proc, "train", "'train.seed' must be <= 4294967295")
    assert not (tmp_path / "over").exists()
