"""MLflow against a real tracking server (SQLite backend in a temporary folder, 127.0.0.1, a free
port), read back through MLflow's own client: what a 2-process run logs, and a run stopped by
SIGTERM and resumed continuing the same MLflow run.

The server takes a while to start, so the tests of this module share one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import (free_port, metrics_events, run_distrain, smoke_args, subprocess_env,
                      train_until_sigterm)
from distrain.signals import EXIT_STOPPED
from distrain.trackers import flatten

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
           f"sqlite:///{root}/mlflow.db", "--default-artifact-root", str(root / "artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=subprocess_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not come up:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.3)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
        try:  # a graceful shutdown waits for the clients' keep-alive connections: not for long
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _run_id(run: Path) -> str:
    return json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"]


def _steps(client, run_id: str, key: str) -> list[int]:
    history = client.get_metric_history(run_id, key)
    return [m.step for m in sorted(history, key=lambda m: m.timestamp)]


def test_two_processes_log_params_metrics_tags_images_and_the_model(tmp_path, mlflow_uri):
    run = tmp_path / "run"
    # 2 x 32 per step: 4 steps per epoch, an interval every 4 steps, 2 epochs.
    args = smoke_args(run, **{"train.epochs": 2, "log.trackers": "[mlflow]",
                              "log.mlflow_uri": mlflow_uri, "log.experiment": "two-procs"})
    proc = run_distrain(["train", *args], nprocs=2)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "warning" not in proc.stderr, proc.stderr[-3000:]
    client = _client(mlflow_uri)
    run_id = _run_id(run)
    r = client.get_run(run_id)
    assert r.info.status == "FINISHED" and r.info.run_name == "run"
    (exp,) = [e for e in client.search_experiments() if e.name == "two-procs"]
    # One run, from rank 0 only.
    assert [x.info.run_id for x in client.search_runs([exp.experiment_id])] == [run_id]
    # The resolved config, every key, as parameters.
    config = flatten(yaml.safe_load((run / "config.yaml").read_text()))
    assert r.data.params == {k: str(v) for k, v in config.items()}
    assert {k: r.data.tags[k] for k in ("world_size", "device", "precision", "global_batch")} == \
        {"world_size": "2", "device": "cpu", "precision": "no", "global_batch": "64"}
    # Metrics at the steps metrics.jsonl has, with its values.
    evals = metrics_events(run, "eval")
    hist = sorted(client.get_metric_history(run_id, "eval/accuracy"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in hist] == [(e["step"], e["accuracy"]) for e in evals]
    assert _steps(client, run_id, "train/loss") == [4, 8]
    assert _steps(client, run_id, "train/lr") == [4, 8]
    assert [m.step for m in client.get_metric_history(run_id, "train/epoch_loss")] == [4, 8]
    assert any(k.startswith("eval_per_class/") for k in r.data.metrics)
    end = metrics_events(run, "end")[0]
    assert r.data.metrics["hparam/final_accuracy"] == end["final_accuracy"]
    assert r.data.metrics["hparam/best_accuracy"] == end["best_accuracy"]
    # The exported model as an artifact, byte for byte, and the confusion-matrix images.
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"model.safetensors", "model.json"} <= names
    got = client.download_artifacts(run_id, "model.safetensors", str(tmp_path))
    assert Path(got).read_bytes() == (run / "model.safetensors").read_bytes()
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    assert any("confusion_matrix" in p and "step+8" in p for p in images), images


# 24 optimizer steps (2 epochs x 12), a checkpoint and a train/loss interval every 3: the first
# checkpoint comes with most of the run still to go.
STOP_CFG = {"data.name": "synthetic", "data.max_train_samples": 1536, "data.max_test_samples": 128,
            "train.epochs": 2, "train.batch_size": 32, "train.grad_accum_steps": 4,
            "checkpoint.every_steps": 3, "log.tensorboard": "false", "log.progress": "lines",
            "log.every_steps": 3, "log.trackers": "[mlflow]", "log.experiment": "requeued"}


def test_a_stopped_and_resumed_run_is_one_mlflow_run(tmp_path, mlflow_uri):
    run = tmp_path / "run"
    args = ["train", f"output_dir={run}", f"log.mlflow_uri={mlflow_uri}",
            *(f"{k}={v}" for k, v in STOP_CFG.items())]
    rc = train_until_sigterm(args, run, tmp_path / "first.log")
    assert rc == EXIT_STOPPED, (tmp_path / "first.log").read_text()[-4000:]
    stop = [e for e in metrics_events(run, "checkpoint") if e["reason"] == "stop"][0]["step"]
    client = _client(mlflow_uri)
    run_id = _run_id(run)
    assert client.get_run(run_id).info.status == "KILLED"
    before = _steps(client, run_id, "train/loss")
    assert before and max(before) <= stop < 24

    resumed = run_distrain(args)  # resume=auto
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-4000:]
    assert _run_id(run) == run_id
    r = client.get_run(run_id)
    assert r.info.status == "FINISHED" and r.data.tags["world_size"] == "1"
    steps = _steps(client, run_id, "train/loss")
    # One curve: every interval once, the first run's points first.
    assert steps == list(range(3, 25, 3)) and steps[:len(before)] == before
    assert [m.step for m in client.get_metric_history(run_id, "eval/accuracy")] == [12, 24]
    (exp,) = [e for e in client.search_experiments() if e.name == "requeued"]
    assert [x.info.run_id for x in client.search_runs([exp.experiment_id])] == [run_id]
    assert "model.safetensors" in {a.path for a in client.list_artifacts(run_id)}
