"""Stopping a real `distrain train` with signals outside SLURM: SIGTERM, Ctrl-C once, Ctrl-C twice, 2 processes.

Each test starts training as a subprocess in a session of its own (as a terminal or a supervisor would run it),
waits until the first checkpoint is in metrics.jsonl (so the run is past set-up and mid-training), signals it, and
checks the promise of distrain.signals: exit 75 after a "stop" checkpoint, and a `resume=auto` run that ends with the
same weights as a run that was never stopped (bitwise: same world size, same config). A second Ctrl-C while the stop
is pending ends the process at once (130) and leaves the committed checkpoints loadable. With DataLoader workers
(which get the group's signals too, see distrain.signals.shield_data_worker) the stop works the same way.

The uninterrupted reference runs are computed once per test session (shared between pytest-xdist workers under a
file lock).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (cached_run_weights, distrain_cmd, load_weights, max_abs_diff, metrics_events, run_distrain,
                      subprocess_env, wait_for_first_checkpoint)
from distrain.ckpt_format import list_checkpoints, read_meta, verify
from distrain.signals import EXIT_STOPPED

pytestmark = pytest.mark.timeout(300)

# Long optimizer steps (4 micro-batches each) so that a signal usually lands inside a step, 24 steps in all,
# a checkpoint every 3: there is always training left when the first checkpoint appears.
ONE_PROC = {"data.name": "synthetic", "data.max_train_samples": 1536, "data.max_test_samples": 128,
            "train.epochs": 2, "train.batch_size": 32, "train.grad_accum_steps": 4, "checkpoint.every_steps": 3,
            "log.tensorboard": "false", "log.progress": "lines", "log.every_steps": 3}
# The same global batch (16 x 2 processes x 4) on two processes.
TWO_PROCS = {**ONE_PROC, "train.batch_size": 16}


def _args(out: Path, cfg: dict) -> list[str]:
    return ["train", f"output_dir={out}", *(f"{k}={v}" for k, v in cfg.items())]


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """reference(name, cfg, nprocs) -> the final weights of an uninterrupted run, computed once per session."""

    def get(name: str, cfg: dict, nprocs: int = 1) -> dict:
        return cached_run_weights(tmp_path_factory, f"stop-signals-{name}", lambda run: _args(run, cfg), nprocs)

    return get


class Training:
    """`distrain train` in a session of its own, output in files (no pipe can fill up and block it)."""

    def __init__(self, run: Path, cfg: dict, nprocs: int = 1):
        self.run = run
        self.log_path = run.parent / f"{run.name}.log"
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(distrain_cmd(_args(run, cfg), nprocs=nprocs), env=subprocess_env(),
                                     stdout=self.log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    @property
    def log(self) -> str:
        self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def events(self, kind: str) -> list[dict]:
        return metrics_events(self.run, kind)

    def wait_for_checkpoint(self, timeout: float = 180) -> dict:
        """The first checkpoint event: the run is mid-training (every_steps checkpoint, more steps to go)."""
        return wait_for_first_checkpoint(
            self.run, lambda: None if self.proc.poll() is None else f"training exited {self.proc.returncode}",
            lambda: "\n" + self.log[-5000:], timeout, poll=0.05)

    def signal_group(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {timeout:g} s after the signal\n{self.log[-5000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log_file.close()


@pytest.fixture
def trainings():
    started: list[Training] = []

    def start(run: Path, cfg: dict, nprocs: int = 1) -> Training:
        t = Training(run, cfg, nprocs)
        started.append(t)
        return t

    yield start
    for t in started:
        t.close()


def _wait_delivered(pid: int, sig: int, timeout: float = 10) -> None:
    """Until the kernel has handed ``sig`` to the process (no longer pending in /proc/PID/status)."""
    bit = 1 << (sig - 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return
        pending = 0
        for line in status.splitlines():
            if line.startswith(("SigPnd:", "ShdPnd:")):
                pending |= int(line.split()[1], 16)
        if not pending & bit:
            return
        time.sleep(0.002)


def _stop_checkpoint(t: Training) -> Path:
    """The run stopped after exactly one "stop" checkpoint, which is committed, intact and holds every rank."""
    stops = [e for e in t.events("checkpoint") if e["reason"] == "stop"]
    assert len(stops) == 1, (stops, t.log[-5000:])
    path = Path(stops[0]["path"])
    meta = verify(path)
    assert meta["reason"] == "stop" and meta["train_state"]["global_step"] == stops[0]["step"]
    assert f"stopped at step {stops[0]['step']}: checkpoint saved" in t.log
    # It stopped mid-run: the final checkpoint and the export are still to come.
    assert 0 < stops[0]["step"] < 24 and not (t.run / "model.safetensors").exists(), t.log[-3000:]
    return path


def _resume_and_compare(run: Path, cfg: dict, want: dict, nprocs: int = 1) -> None:
    proc = run_distrain(_args(run, cfg), nprocs=nprocs, check=True)  # resume=auto is the default
    assert "resumed from" in proc.stderr, proc.stderr[-3000:]
    assert max_abs_diff(load_weights(run / "model.safetensors"), want) == 0.0


# DataLoader workers (image folders use them) get the group's signal too, and must outlive it until the stop
# checkpoint is written. The loader does not change the numbers: the same reference weights.
WITH_WORKERS = {**ONE_PROC, "data.loader": "dataloader", "data.num_workers": 2}


@pytest.mark.slow
@pytest.mark.parametrize("sig,cfg", [(signal.SIGTERM, ONE_PROC), (signal.SIGINT, ONE_PROC),
                                     (signal.SIGTERM, WITH_WORKERS), (signal.SIGINT, WITH_WORKERS)],
                         ids=["SIGTERM", "SIGINT", "SIGTERM-loader-workers", "SIGINT-loader-workers"])
def test_one_signal_checkpoints_exits_75_and_resumes_exactly(tmp_path, trainings, reference, sig, cfg):
    run = tmp_path / "run"
    t = trainings(run, cfg)
    t.wait_for_checkpoint()
    t0 = time.monotonic()
    t.signal_group(sig)
    rc = t.wait()
    took = time.monotonic() - t0
    assert rc == EXIT_STOPPED, t.log[-5000:]
    # The current step, a checkpoint and the exit: well inside SLURM's KillWait (30 s) even on a busy host.
    assert took < 20, (took, t.log[-3000:])
    _stop_checkpoint(t)
    _resume_and_compare(run, cfg, reference("1proc", ONE_PROC))


@pytest.mark.slow
def test_second_sigint_stops_at_once_and_committed_checkpoints_stay_loadable(tmp_path, trainings, reference):
    run = tmp_path / "run"
    t = trainings(run, ONE_PROC)
    t.wait_for_checkpoint()
    t.signal_group(signal.SIGINT)
    # Once the first Ctrl-C has reached the process, a second one while the stop is pending (the rest of a
    # 4-micro-batch step and the checkpoint write) raises KeyboardInterrupt at once.
    _wait_delivered(t.proc.pid, signal.SIGINT)
    time.sleep(0.03)
    t0 = time.monotonic()
    t.signal_group(signal.SIGINT)
    rc = t.wait(timeout=30)
    assert rc == 130, (rc, t.log[-5000:])
    assert time.monotonic() - t0 < 10
    assert "interrupted" in t.log, t.log[-3000:]
    # Whatever was being written when it stopped was rolled back; every committed checkpoint is intact...
    found = list_checkpoints(run / "checkpoints")
    assert found, t.log[-3000:]
    for d in found:
        verify(d)
    newest = found[-1]
    steps = read_meta(newest)["train_state"]["global_step"]
    # ...and the newest one resumes, to the same weights as the run that was never stopped.
    proc = run_distrain(_args(run, ONE_PROC), check=True)
    assert f"resumed from {newest}" in proc.stderr and f"step {steps}" in proc.stderr, proc.stderr[-3000:]
    assert max_abs_diff(load_weights(run / "model.safetensors"), reference("1proc", ONE_PROC)) == 0.0


@pytest.mark.slow
def test_two_processes_sigterm_to_the_launcher_group(tmp_path, trainings, reference):
    """`accelerate launch` forwards the SIGTERM to its workers (they run in sessions of their own): both ranks
    agree, write one checkpoint together and exit before the launcher's 30 s kill deadline."""
    run = tmp_path / "run"
    t = trainings(run, TWO_PROCS, nprocs=2)
    t.wait_for_checkpoint()
    t0 = time.monotonic()
    t.signal_group(signal.SIGTERM)
    rc = t.wait()
    took = time.monotonic() - t0
    # The launcher itself dies of the forwarded signal (SignalException, exit 1); the workers exited on their own.
    assert rc != 0, t.log[-5000:]
    assert took < 25 and "SIGKILL" not in t.log, (took, t.log[-5000:])
    path = _stop_checkpoint(t)
    meta = read_meta(path)
    assert meta["world_size"] == 2
    assert {"rank-00000.json", "rank-00001.json"} <= set(meta["files"])
    assert t.log.count("stopped at step") == 1  # logged by the main process only
    _resume_and_compare(run, TWO_PROCS, reference("2procs", TWO_PROCS, nprocs=2), nprocs=2)


SHIELDED = r"""
import sys, time
from distrain.signals import shield_data_worker
shield_data_worker(0)
print("ready", flush=True)
time.sleep(60)
"""


def test_shielded_data_worker_ignores_stop_signals_except_its_parents_sigterm():
    """What DataLoader workers run first (worker_init_fn): the group's stop signals pass them by, but the SIGTERM
    of their own parent (multiprocessing's terminate() at exit) still ends them at once, as torch's handler does."""
    child = subprocess.Popen([sys.executable, "-c", SHIELDED], stdout=subprocess.PIPE, text=True,
                             env=subprocess_env())
    try:
        assert child.stdout.readline().strip() == "ready"
        # Sent by another process, as SLURM, `kill -- -PGID` or a terminal's Ctrl-C would.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGTERM):
            subprocess.run([sys.executable, "-c", f"import os; os.kill({child.pid}, {int(sig)})"], check=True)
        time.sleep(0.5)
        assert child.poll() is None
        child.send_signal(signal.SIGTERM)  # from its parent
        assert child.wait(timeout=20) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
