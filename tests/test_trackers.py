"""Trackers beside TensorBoard, on real runs: metrics.csv row by row, W&B offline, an MLflow server
that is down, a tracker library that is not installed, and the log.trackers key.

(The real MLflow tracking server tests are in test_trackers_mlflow.py.)
"""

from __future__ import annotations

import csv
import glob
import json
import re
import shutil
import struct
from pathlib import Path

import pytest

from conftest import free_port, metrics_events, run_distrain, smoke_args, subprocess_env
from distrain.config import load_config
from distrain.errors import UserError
from distrain.trackers import CsvFile, Guarded

pytestmark = pytest.mark.timeout(300)


def _train(run: Path, env=None, **over):
    return run_distrain(["train", *smoke_args(run, **over)], env=env)


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


# -- csv ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_csv_rows_are_the_runs_story_in_order(tmp_path):
    run = tmp_path / "run"
    # 256 images / 32 = 8 steps per epoch, an interval every 4 steps, 2 epochs.
    _ok(_train(run, **{"train.epochs": 2, "log.trackers": "[csv]"}))
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert list(rows[0]) == list(CsvFile.COLUMNS)
    meta = ("step", "time_utc")
    filled = [(int(r["step"]), sorted(k for k, v in r.items() if v and k not in meta))
              for r in rows]
    interval = ["train/images_per_s", "train/loss", "train/lr"]
    epoch = ["train/epoch_accuracy", "train/epoch_loss"]
    evaluation = ["eval/accuracy", "eval/loss"]
    final = ["hparam/best_accuracy", "hparam/final_accuracy", "hparam/final_loss"]
    assert filled == [(4, interval), (8, interval), (8, epoch), (8, evaluation),
                      (12, interval), (16, interval), (16, epoch), (16, evaluation), (16, final)]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", r["time_utc"]) for r in rows)
    # The numbers are metrics.jsonl's, digit for digit.
    trains, evals = metrics_events(run, "train"), metrics_events(run, "eval")
    end = metrics_events(run, "end")[0]
    assert [(r["train/epoch_loss"], r["train/epoch_accuracy"]) for r in (rows[2], rows[6])] == \
        [(repr(e["loss"]), repr(e["accuracy"])) for e in trains]
    assert [(r["eval/loss"], r["eval/accuracy"]) for r in (rows[3], rows[7])] == \
        [(repr(e["loss"]), repr(e["accuracy"])) for e in evals]
    assert [rows[8][f"hparam/{k}"] for k in ("final_accuracy", "best_accuracy", "final_loss")] \
        == [repr(end["final_accuracy"]), repr(end["best_accuracy"]), repr(evals[-1]["loss"])]
    assert float(rows[0]["train/lr"]) > 0 and float(rows[0]["train/images_per_s"]) > 0
    assert not (run / "tb").exists()  # log.trackers without tensorboard: no event files


def test_csv_appends_under_its_header_after_a_torn_row(tmp_path):
    path = tmp_path / "metrics.csv"
    old = ["time_utc,step,eval/accuracy", "2026-01-01 00:00:00,4,0.5", "2026-01-01 00:00:01,8,0."]
    path.write_text("\n".join(old))  # the last row torn by a crash
    CsvFile(tmp_path).metrics({"eval/accuracy": 0.75, "train/loss": 1.0}, step=12)
    lines = path.read_text().splitlines()
    assert lines[:3] == old
    assert re.fullmatch(r"\S+ \S+,12,0\.75", lines[3]) and len(lines) == 4


def test_a_failing_tracker_warns_once_and_is_switched_off(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    warnings = []
    guarded = Guarded(CsvFile(run), warnings.append)
    guarded.call("metrics", {"eval/accuracy": 0.5}, 4)
    shutil.rmtree(run)  # the file system goes away under the run
    for step in (8, 12):
        guarded.call("metrics", {"eval/accuracy": 0.5}, step)
    assert len(warnings) == 1 and not guarded.on
    assert "csv: metrics failed (FileNotFoundError" in warnings[0]
    assert "tracking is off for the rest of this run" in warnings[0]


# -- W&B offline ----------------------------------------------------------------------------------
def _wandb_records(path: Path) -> list:
    """The protobuf records of a W&B offline run file (LevelDB log format: 32 KiB blocks of
    records with 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, part, out = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        # FULL/FIRST start a record, MIDDLE/LAST extend it.
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(part)
            out.append(rec)
    return out


@pytest.mark.slow
def test_wandb_offline_run_holds_config_metrics_tags_and_model(tmp_path):
    run = tmp_path / "run"
    # Task 1 of SLURM array job 4711 (job id 4712): the tags name it.
    env = subprocess_env(WANDB_MODE="offline", WANDB_SILENT="true",
                         WANDB_CONFIG_DIR=tmp_path / "wandb-cfg", SLURM_JOB_ID=4712,
                         SLURM_ARRAY_JOB_ID=4711, SLURM_ARRAY_TASK_ID=1)
    _ok(_train(run, env=env, **{"train.epochs": 2, "log.trackers": "[wandb]",
                                "log.experiment": "sweep"}))
    (offline,) = glob.glob(str(run / "wandb" / "offline-run-*"))
    (run_file,) = glob.glob(f"{offline}/run-*.wandb")
    recs = _wandb_records(Path(run_file))
    runs = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    assert runs[0].project == "sweep" and runs[0].display_name == "run"
    assert runs[0].run_id == json.loads((run / "trackers.json").read_text())["wandb"]["run_id"]
    config = {u.key: json.loads(u.value_json) for u in runs[-1].config.update}
    assert config["train"]["lr"] == 0.01 and config["data"]["name"] == "synthetic"
    assert {"world_size=1", "device=cpu", "precision=no", "global_batch=32", "slurm_job=4711_1",
            "slurm_job_id=4712", "slurm_array_job_id=4711", "slurm_array_task_id=1"} \
        <= set(runs[-1].tags)
    history = {}
    for r in recs:
        if r.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                     for i in r.history.item}
            history[items["_step"]] = items
    evals = metrics_events(run, "eval")
    assert [history[e["step"]]["eval/accuracy"] for e in evals] == [e["accuracy"] for e in evals]
    assert history[4]["train/loss"] > 0 and history[8]["eval/confusion_matrix/count"] == 1
    media = Path(offline) / "files" / "media" / "images"
    assert glob.glob(f"{media}/eval/confusion_matrix_8_*.png")
    assert glob.glob(f"{media}/train/augmented_batch_0_*.png")
    end = metrics_events(run, "end")[0]
    assert history[16]["hparam/final_accuracy"] == end["final_accuracy"]
    saved = Path(offline) / "files" / "model.safetensors"
    assert saved.read_bytes() == (run / "model.safetensors").read_bytes()
    exits = [r.exit for r in recs if r.WhichOneof("record_type") == "exit"]
    assert exits and exits[-1].exit_code == 0


# -- failures -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_mlflow_server_down_warns_once_and_training_completes(tmp_path):
    run = tmp_path / "run"
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = _ok(_train(run, **{"log.trackers": "[tensorboard,mlflow,csv]", "log.tensorboard": "true",
                              "log.mlflow_uri": uri}))
    warnings = [l for l in proc.stderr.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1, proc.stderr[-3000:]
    assert "mlflow" in warnings[0] and uri in warnings[0]
    assert metrics_events(run, "end") and len(metrics_events(run, "eval")) == 1
    assert glob.glob(str(run / "tb" / "events.out.tfevents.*")) and (run / "metrics.csv").is_file()
    assert not (run / "trackers.json").exists()  # no tracker run to continue


@pytest.mark.slow
def test_tracker_not_installed_is_a_user_error_naming_the_extra(tmp_path):
    # The path finder sees no `wandb` module or distribution, as where the package is not installed.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "from importlib.machinery import PathFinder\n"
        "class _NoWandb:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] != 'wandb':\n"
        "            return PathFinder.find_spec(name, path, target)\n"
        "    def find_distributions(self, *args, **kwargs):\n"
        "        return (d for d in PathFinder.find_distributions(*args, **kwargs)\n"
        "                if (d.metadata['Name'] or '').lower() != 'wandb')\n"
        "    def invalidate_caches(self):\n"
        "        PathFinder.invalidate_caches()\n"
        "sys.meta_path[:] = [_NoWandb() if f is PathFinder else f for f in sys.meta_path]\n")
    env = subprocess_env()
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    run = tmp_path / "run"
    proc = _train(run, env=env, **{"log.trackers": "[csv,wandb]"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "log.trackers" in last and "distrain[wandb]" in last and "Traceback" not in proc.stderr
    assert not (run / "metrics.jsonl").exists()  # stopped before training


def test_log_trackers_key_takes_a_list_or_one_name():
    assert load_config(None, ["log.trackers=[mlflow,csv]"]).log.trackers == ["mlflow", "csv"]
    assert load_config(None, ["log.trackers=wandb"]).log.trackers == ["wandb"]
    assert load_config().log.trackers == ["tensorboard"]
    with pytest.raises(UserError, match="log.trackers.*'tensorboard', 'csv', 'mlflow', 'wandb'"):
        load_config(None, ["log.trackers=[mlfow]"])
