"""The real slurm/train.sbatch running real distrain training on the local two-node SLURM cluster.

Jobs are submitted from the repository root exactly as a user would (``sbatch [options] slurm/train.sbatch KEY=VALUE
...``), with the interpreter running these tests (DISTRAIN_PYTHON: it has distrain's dependencies, in CI the
checkout's .venv) and this checkout on PYTHONPATH. Everything a job writes goes under the test's tmp_path: the run
directory (output_dir=...) and sbatch's own output file (--output). The jobs run as the submitting user (root: the
local cluster needs root), so they can write there.

  a. one node: COMPLETED, the exported model, metrics, TensorBoard and the job log in the run directory;
  b. two nodes with one process each and half the batch: the weights of one process with the whole batch;
  c. ``scontrol requeue`` mid-run (SIGTERM from SLURM to every process, DataLoader workers included): checkpoint,
     exit 75 well within KillWait, back in the queue, released, resumed: COMPLETED with the weights of a run that
     was never interrupted;
  d. ``scancel --signal=USR1 --full`` mid-run on two nodes (what the time limit sends, plus the batch shell): both
     ranks checkpoint, rank 0 requeues the job itself, released, resumed: the weights of an uninterrupted run.

Without SLURM (not root, no apt, daemons that do not start) the tests skip with the reason; with CI=true they fail.
The uninterrupted reference runs are plain `python -m distrain train` runs on this host, computed once per session.
"""

from __future__ import annotations


import sys
import time
from pathlib import Path

import pytest

import slurm_helpers as sh
from conftest import (cached_run_weights, load_weights, max_abs_diff, metrics_events, subprocess_env,
                      wait_for_first_checkpoint)
from distrain.signals import EXIT_STOPPED

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(400)]

# 2 epochs x 63 steps of 32 images, a checkpoint every 10 steps: seconds of training, interrupted after the
# first checkpoint (step 10) with 100+ steps to go. Augmentation on (the default): resuming is exact with it.
RESUME_CFG = {"data.name": "synthetic", "data.max_train_samples": 2000, "data.max_test_samples": 200,
              "train.epochs": 2, "train.batch_size": 32, "checkpoint.every_steps": 10, "log.tensorboard": "false",
              "log.progress": "lines", "log.every_steps": 10}
RESUME_CFG_2 = {**RESUME_CFG, "train.batch_size": 16}  # two processes, the same global batch
# World-size independence (b): augmentation off, as the spec's promise says.
SHARD_CFG = {"data.name": "synthetic", "data.max_train_samples": 1024, "data.max_test_samples": 128,
             "train.epochs": 2, "train.batch_size": 32, "data.augment": "false", "log.tensorboard": "false",
             "log.progress": "lines"}


def _kv(cfg: dict) -> list[str]:
    return [f"{k}={v}" for k, v in cfg.items()]


# --- fixtures --------------------------------------------------------------------------------------------------




@pytest.fixture
def job_env(slurm_cluster):
    """What sbatch exports to the job: this interpreter and checkout, one thread per process, CPU-only nodes."""
    env = subprocess_env(DISTRAIN_PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    for k in list(env):
        if k.startswith("SLURM_") or k in ("DISTRAIN_ROOT", "DISTRAIN_MASTER_ADDR", "DISTRAIN_MASTER_PORT",
                                           "DISTRAIN_PROCS_PER_NODE", "DISTRAIN_MODULE", "VIRTUAL_ENV",
                                           "CONDA_PREFIX"):
            del env[k]
    env["SLURM_CONF"] = slurm_cluster.env["SLURM_CONF"]
    return env


class Job:
    def __init__(self, job_id: str, run: Path, out_dir: Path, env: dict):
        self.id, self.run, self.out_dir, self.env = job_id, run, out_dir, env

    @property
    def log(self) -> str:
        p = self.run / f"slurm-{self.id}.log"
        return p.read_text(errors="replace") if p.exists() else f"(no {p})"

    def wait_for_log(self, *texts: str, timeout: float = 30) -> str:
        """The job log once it holds every one of ``texts`` (lines reach it through tee, a little behind)."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log
            if all(t in log for t in texts) or time.monotonic() > deadline:
                return log
            time.sleep(0.2)

    def context(self) -> str:
        """Everything useful when an assertion fails."""
        out = self.out_dir / f"slurm-{self.id}.out"
        ctx = f"\n--- job: {sh.job_info(self.id, self.env)}\n--- run-dir log:\n{self.log[-8000:]}"
        if not (self.run / f"slurm-{self.id}.log").exists() and out.exists():  # the script failed before tee
            ctx += f"\n--- sbatch output:\n{out.read_text(errors='replace')[-4000:]}"
        return ctx

    def events(self, kind: str) -> list[dict]:
        return metrics_events(self.run, kind)

    def wait_for_checkpoint(self, timeout: float = 180) -> dict:
        """The first checkpoint event: the job is past start-up and mid-training."""

        def ended():
            info = sh.job_info(self.id, self.env)
            return "job ended" if info is None or info.get("JobState") in sh.TERMINAL_STATES else None

        return wait_for_first_checkpoint(self.run, ended, self.context, timeout)

    def wait(self, states, timeout: float = 180) -> dict:
        try:
            return sh.wait_for(self.id, states, timeout=timeout, env=self.env)
        except sh.SlurmError as e:
            pytest.fail(f"{e}{self.context()}")

    def weights(self) -> dict:
        return load_weights(self.run / "model.safetensors")


@pytest.fixture
def submit(job_env, tmp_path):
    """submit(sbatch options, distrain arguments) -> Job; jobs still queued or running at the end are cancelled."""
    jobs: list[Job] = []

    def _submit(options: list[str], args: list[str], name: str = "run") -> Job:
        run = tmp_path / name
        out_dir = tmp_path / "sbatch-out"
        out_dir.mkdir(exist_ok=True)
        cmd = ["--job-name", f"distrain-test-{name}", f"--output={out_dir}/slurm-%j.out", *options,
               "slurm/train.sbatch", f"output_dir={run}", *args]
        try:
            job_id = sh.submit(cmd, env=job_env, cwd=REPO)
        except sh.SlurmError as e:
            pytest.fail(str(e))
        job = Job(job_id, run, out_dir, job_env)
        jobs.append(job)
        return job

    yield _submit
    for j in jobs:
        sh.cancel(j.id, env=job_env)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """reference(name, cfg, nprocs) -> final weights of an uninterrupted local run, computed once per session."""

    def get(name: str, cfg: dict, nprocs: int = 1) -> dict:
        return cached_run_weights(tmp_path_factory, f"slurm-jobs-{name}",
                                  lambda run: ["train", f"output_dir={run}", *_kv(cfg)], nprocs)

    return get


def _assert_stopped_cleanly(job: Job, t0: float, pending: dict) -> None:
    """After a stop signal: one "stop" checkpoint, exit 75, out of RUNNING before SLURM's SIGKILL."""
    elapsed = time.monotonic() - t0
    job.wait_for_log("checkpoint saved")
    ctx = job.context()
    assert elapsed < 30, ctx  # KillWait is 30 s: the trainers exited on their own, before any SIGKILL
    assert pending["Restarts"] >= 1, ctx
    stops = [e for e in job.events("checkpoint") if e["reason"] == "stop"]
    assert len(stops) == 1, ctx
    assert 10 <= stops[0]["step"] < 126, ctx  # mid-run
    assert f"stopped at step {stops[0]['step']}: checkpoint saved" in job.log, ctx
    assert "(restart 0)" in job.log and "(restart 1)" not in job.log, ctx


def _assert_resumed_and_completed(job: Job) -> None:
    info = job.wait({"COMPLETED"}, timeout=240)
    ctx = job.context()
    assert info["Restarts"] >= 1 and info["ExitCode"] == "0:0", ctx
    assert f"job {job.id} (restart 1)" in job.log and "resumed from" in job.log, ctx
    assert job.log.rstrip().endswith("srun exited with 0"), ctx
    assert (job.run / "model.safetensors").exists(), ctx


# --- the tests -------------------------------------------------------------------------------------------------


def test_one_node_job_completes_with_model_metrics_and_log(submit, reference):
    job = submit([], _kv({**RESUME_CFG, "log.tensorboard": "true"}))
    info = job.wait({"COMPLETED"}, timeout=240)
    ctx = job.context()
    assert info["ExitCode"] == "0:0" and info["Restarts"] == 0, ctx
    assert (job.run / "model.safetensors").exists() and (job.run / "model.json").exists(), ctx
    assert [e["samples"] for e in job.events("train")] == [2000, 2000], ctx
    assert job.events("eval")[-1]["samples"] == 200, ctx
    assert list((job.run / "tb").rglob("events.out.tfevents.*")), ctx
    log = job.log
    assert f"job {job.id} (restart 0) on n" in log and "[slurm_node] node 0/1" in log, log
    assert "distrain train: done" in log and log.rstrip().endswith("srun exited with 0"), log
    # The same bits as the same training run directly on this host (TensorBoard changes nothing).
    assert max_abs_diff(job.weights(), reference("1proc", RESUME_CFG)) == 0.0


def test_two_nodes_half_batch_each_match_one_process(submit, reference):
    job = submit(["--nodes", "2"], _kv({**SHARD_CFG, "train.batch_size": 16}))
    info = job.wait({"COMPLETED"}, timeout=240)
    ctx = job.context()
    assert info["ExitCode"] == "0:0" and info["NodeList"] == "n[1-2]", ctx
    log = job.log
    assert "[slurm_node] node 0/2 (n1)" in log and "[slurm_node] node 1/2 (n2)" in log, ctx
    assert "world size 2" in log and "global 32 = 16 per process x 2 processes" in log, ctx
    assert [e["samples"] for e in job.events("train")] == [1024, 1024], ctx
    assert max_abs_diff(job.weights(), reference("shard-1proc", SHARD_CFG)) <= 1e-4


def test_scontrol_requeue_mid_run_resumes_to_the_same_weights(submit, reference):
    # With DataLoader workers: SLURM signals every process of the step, and they must outlive the SIGTERM until the
    # stop checkpoint is written. The loader does not change the numbers (same reference).
    job = submit([], _kv({**RESUME_CFG, "data.loader": "dataloader", "data.num_workers": 2}))
    job.wait_for_checkpoint()
    t0 = time.monotonic()
    sh.requeue(job.id, env=job.env)  # SIGTERM to every process of the job, then back to the queue
    pending = job.wait({"PENDING"}, timeout=60)
    _assert_stopped_cleanly(job, t0, pending)
    assert f"srun exited with {EXIT_STOPPED}" in job.wait_for_log(f"srun exited with {EXIT_STOPPED}"), job.context()  # the trainer's own exit, no SIGKILL
    sh.release(job.id, env=job.env)
    _assert_resumed_and_completed(job)
    assert max_abs_diff(job.weights(), reference("1proc", RESUME_CFG)) <= 1e-6


def test_usr1_two_nodes_checkpoint_self_requeue_and_resume(submit, reference):
    job = submit(["--nodes", "2"], _kv(RESUME_CFG_2))
    job.wait_for_checkpoint()
    t0 = time.monotonic()
    sh.signal_job(job.id, "USR1", full=True, env=job.env)  # as the time-limit warning, plus the batch shell
    pending = job.wait({"PENDING"}, timeout=60)
    _assert_stopped_cleanly(job, t0, pending)
    log = job.wait_for_log(f"requeued SLURM job {job.id}", "batch shell got SIGUSR1", "srun exited with")
    assert f"requeued SLURM job {job.id}" in log and "batch shell got SIGUSR1" in log, job.context()
    sh.release(job.id, env=job.env)
    _assert_resumed_and_completed(job)
    assert max_abs_diff(job.weights(), reference("2procs", RESUME_CFG_2, nprocs=2)) <= 1e-6
