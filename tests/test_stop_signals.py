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
import pty
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import (cached_run_weights, distrain_cmd, load_weights, max_abs_diff, metrics_events, run_distrain,
                      subprocess_env, wait_for_first_checkpoint)
from distrain.ckpt_format import list_checkpoints, read_meta, verify
from distrain.signals import EXIT_STOPPED

pytestmark = pytest.mark.timeout(600)

# Long optimizer steps (4 micro-batches each) so that a signal usually lands inside a step, 24 steps
# in all, a checkpoint every 3: there is always training left when the first checkpoint appears.
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


# Makes the pty on stdin the controlling terminal of the new session, as a login shell's is, then
# runs the command.
TTY_SESSION = r"""
import fcntl, os, sys, termios
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


class Terminal:
    """A pseudo-terminal whose output is drained by a thread (a full pty would block the run); hang_up() closes it
    as sshd does when the connection drops: the kernel hangs the terminal up and sends SIGHUP to its session."""

    def __init__(self):
        self.master, self.slave = pty.openpty()
        self.output = bytearray()
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        while not self._closing.is_set():
            if select.select([self.master], [], [], 0.05)[0]:
                try:
                    data = os.read(self.master, 65536)
                except OSError:
                    return
                if not data:
                    return
                self.output += data

    def hang_up(self) -> None:
        if self.master < 0:
            return
        self._closing.set()
        self._reader.join()
        os.close(self.master)
        self.master = -1


class Training:
    """`distrain train` in a session of its own, output in files (no pipe can fill up and block it); with
    `terminal`, on that pseudo-terminal instead, which is then its controlling terminal."""

    def __init__(self, run: Path, cfg: dict, nprocs: int = 1, terminal: "Terminal | None" = None):
        self.run = run
        self.log_path = run.parent / f"{run.name}.log"
        self.log_file = open(self.log_path, "w")
        cmd = distrain_cmd(_args(run, cfg), nprocs=nprocs)
        out = dict(stdout=self.log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if terminal is not None:
            cmd = [sys.executable, "-c", TTY_SESSION, *cmd[1:]]
            out = dict(stdin=terminal.slave, stdout=terminal.slave, stderr=terminal.slave)
        self.terminal = terminal
        self.proc = subprocess.Popen(cmd, env=subprocess_env(), start_new_session=True, **out)
        if terminal is not None:
            os.close(terminal.slave)

    @property
    def log(self) -> str:
        if self.terminal is not None:
            return self.terminal.output.decode(errors="replace")
        self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def workers(self) -> list[psutil.Process]:
        """The launcher's worker processes (they run in sessions of their own), ordered by rank."""
        found = []
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                rank = p.environ().get("RANK")
            except psutil.Error:
                continue
            if rank is not None:
                found.append((int(rank), p))
        return [p for _, p in sorted(found, key=lambda rp: rp[0])]

    def events(self, kind: str) -> list[dict]:
        return metrics_events(self.run, kind)

    def wait_for_checkpoint(self, timeout: float = 400) -> dict:
        """The first checkpoint event: the run is mid-training (every_steps checkpoint, more steps to go)."""
        return wait_for_first_checkpoint(
            self.run, lambda: None if self.proc.poll() is None else f"training exited {self.proc.returncode}",
            lambda: "\n" + self.log[-5000:], timeout, poll=0.05)

    def signal_group(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float = 240) -> int:
        """The exit code; ``timeout`` only guards against a hang."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {timeout:g} s after the signal\n{self.log[-5000:]}")

    def close(self) -> None:
        try:
            left = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            left = []
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for p in left:  # workers run in sessions of their own: not in the launcher's group
            try:
                p.kill()
            except psutil.Error:
                pass
        if self.terminal is not None:
            self.terminal.hang_up()
        self.log_file.close()


@pytest.fixture
def trainings():
    started: list[Training] = []

    def start(run: Path, cfg: dict, nprocs: int = 1, **kw) -> Training:
        t = Training(run, cfg, nprocs, **kw)
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


def _stop_checkpoint(t: Training, logged: bool = True) -> Path:
    """The run stopped after exactly one "stop" checkpoint, which is committed, intact and holds every rank."""
    stops = [e for e in t.events("checkpoint") if e["reason"] == "stop"]
    assert len(stops) == 1, (stops, t.log[-5000:])
    path = Path(stops[0]["path"])
    meta = verify(path)
    assert meta["reason"] == "stop" and meta["train_state"]["global_step"] == stops[0]["step"]
    assert not logged or f"stopped at step {stops[0]['step']}: checkpoint saved" in t.log
    # It stopped mid-run: the final checkpoint and the export are still to come.
    assert 0 < stops[0]["step"] < 24 and not (t.run / "model.safetensors").exists(), t.log[-3000:]
    return path


def _resume_and_compare(run: Path, cfg: dict, want: dict, nprocs: int = 1) -> None:
    proc = run_distrain(_args(run, cfg), nprocs=nprocs, check=True)  # resume=auto is the default
    assert "resumed from" in proc.stderr, proc.stderr[-3000:]
    assert max_abs_diff(load_weights(run / "model.safetensors"), want) == 0.0


# DataLoader workers (image folders use them) get the group's signal too, and must outlive it until
# the stop checkpoint is written. The loader does not change the numbers: the same reference
# weights.
WITH_WORKERS = {**ONE_PROC, "data.loader": "dataloader", "data.num_workers": 2}


@pytest.mark.slow
@pytest.mark.parametrize("sig,cfg", [(signal.SIGTERM, ONE_PROC), (signal.SIGINT, ONE_PROC),
                                     (signal.SIGTERM, WITH_WORKERS), (signal.SIGINT, WITH_WORKERS)],
                         ids=["SIGTERM", "SIGINT", "SIGTERM-loader-workers", "SIGINT-loader-workers"])
def test_one_signal_checkpoints_exits_75_and_resumes_exactly(tmp_path, trainings, reference, sig, cfg):
    run = tmp_path / "run"
    t = trainings(run, cfg)
    t.wait_for_checkpoint()
    t.signal_group(sig)
    rc = t.wait()
    # It exited on its own (75), after finishing the step and writing its checkpoint: no time bound
    # here, a busy host makes it slower, not wrong (the SLURM tests check it against KillWait's real
    # SIGKILL).
    assert rc == EXIT_STOPPED, t.log[-5000:]
    _stop_checkpoint(t)
    _resume_and_compare(run, cfg, reference("1proc", ONE_PROC))


@pytest.mark.slow
def test_second_sigint_stops_at_once_and_committed_checkpoints_stay_loadable(tmp_path, trainings, reference):
    run = tmp_path / "run"
    t = trainings(run, ONE_PROC)
    t.wait_for_checkpoint()
    t.signal_group(signal.SIGINT)
    # Once the first Ctrl-C has reached the process, a second one while the stop is pending (the
    # rest of a 4-micro-batch step and the checkpoint write) raises KeyboardInterrupt at once.
    _wait_delivered(t.proc.pid, signal.SIGINT)
    time.sleep(0.03)
    t.signal_group(signal.SIGINT)
    rc = t.wait()
    assert rc == 130, (rc, t.log[-5000:])  # at once: a finished stop would have exited 75
    assert "interrupted" in t.log, t.log[-3000:]
    # Whatever was being written when it stopped was rolled back; every committed checkpoint is
    # intact...
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
    t.signal_group(signal.SIGTERM)
    rc = t.wait()
    # The launcher itself dies of the forwarded signal (SignalException, exit 1); the workers exited
    # on their own, before its 30 s deadline (it would have said it sent SIGKILL).
    assert rc != 0, t.log[-5000:]
    assert "SIGKILL" not in t.log, t.log[-5000:]
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


# --- the terminal closes, the launcher dies, a peer freezes
# --------------------------------------------------


@pytest.mark.slow
def test_terminal_closed_sighup_checkpoints_exits_75_and_resumes_exactly(tmp_path, trainings, reference):
    """An SSH session drops: the run's terminal is hung up, the kernel sends SIGHUP to the session. The stop
    path must not trip over the dead terminal (every write to it fails), so what it prints after is lost."""
    run = tmp_path / "run"
    t = trainings(run, ONE_PROC, terminal=Terminal())
    t.wait_for_checkpoint()
    t.terminal.hang_up()
    assert t.wait() == EXIT_STOPPED, t.log[-5000:]
    _stop_checkpoint(t, logged=False)
    _resume_and_compare(run, ONE_PROC, reference("1proc", ONE_PROC))


@pytest.mark.slow
def test_two_processes_sighup_to_the_launcher_group(tmp_path, trainings, reference):
    """The terminal's SIGHUP reaches `accelerate launch` only (its workers run in sessions of their own); it
    forwards SIGHUP to them, and they stop as on SIGTERM: one checkpoint, no worker traceback."""
    run = tmp_path / "run"
    t = trainings(run, TWO_PROCS, nprocs=2)
    t.wait_for_checkpoint()
    t.signal_group(signal.SIGHUP)
    assert t.wait() != 0, t.log[-5000:]  # the launcher reports the forwarded signal as its own failure
    log = t.log
    assert "SIGKILL" not in log and log.count("stopped at step") == 1, log[-5000:]
    assert "closing signal SIGHUP" in log, log[-5000:]  # the elastic agent forwarded it to both workers
    # The one traceback is the launcher's own report of the signal it got (torch's SignalException,
    # as on SIGTERM).
    assert log.count("Traceback (most recent call last)") == log.count("SignalException: Process") == 1, log[-5000:]
    assert read_meta(_stop_checkpoint(t))["world_size"] == 2
    _resume_and_compare(run, TWO_PROCS, reference("2procs", TWO_PROCS, nprocs=2), nprocs=2)


@pytest.mark.slow
def test_killed_launcher_takes_its_workers_down_with_a_stop_checkpoint(tmp_path, trainings, reference):
    """kill -9 of `accelerate launch`: no forwarding, no clean-up. Each worker gets SIGTERM from the kernel
    (PR_SET_PDEATHSIG) and stops the normal way, instead of training on as an orphan."""
    run = tmp_path / "run"
    t = trainings(run, TWO_PROCS, nprocs=2)
    t.wait_for_checkpoint()
    workers = t.workers()
    assert len(workers) == 2, workers
    t.proc.kill()
    t.proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=240)  # a hang guard: they exit within seconds
    assert not alive, (alive, t.log[-5000:])
    assert t.log.count("stopped at step") == 1, t.log[-5000:]
    for d in list_checkpoints(run / "checkpoints"):
        verify(d)
    assert read_meta(_stop_checkpoint(t))["world_size"] == 2
    _resume_and_compare(run, TWO_PROCS, reference("2procs", TWO_PROCS, nprocs=2), nprocs=2)


@pytest.mark.slow
def test_frozen_rank_is_named_and_the_run_ends(tmp_path, trainings):
    """A SIGSTOPped rank: the other stops within the peer timeout, naming it, instead of waiting in its next
    collective for gloo's 30 minutes; the launcher then ends the frozen one; the checkpoints stay intact."""
    run = tmp_path / "run"
    t = trainings(run, {**TWO_PROCS, "train.epochs": 40, "train.peer_timeout_s": 20}, nprocs=2)
    t.wait_for_checkpoint()
    workers = t.workers()
    assert len(workers) == 2, workers
    frozen = workers[1]
    frozen.suspend()  # SIGSTOP
    rc = t.wait(timeout=280)  # a hang guard: rank 0 gives up after 20 s, the launcher kills rank 1 30 s later
    log = t.log
    assert rc != 0, log[-5000:]
    named = f"rank 1 (pid {frozen.pid} on host {socket.gethostname()}) has not responded for"
    assert named in log and "(frozen or lost); stopping" in log, log[-5000:]
    assert "[rank0]: Traceback" not in log, log[-5000:]
    _no_worker_left_and_checkpoints_intact(workers, run)


@pytest.mark.slow
def test_collective_timeout_ends_a_run_whose_peer_froze_without_the_watchdog(tmp_path, trainings):
    """train.collective_timeout_s reaches the process group: with the watchdog off, the live rank's collective
    fails after 10 s, not after gloo's default 30 minutes (the hang guard below is far shorter)."""
    run = tmp_path / "run"
    cfg = {**TWO_PROCS, "train.epochs": 40, "train.peer_timeout_s": "null", "train.collective_timeout_s": 10}
    t = trainings(run, cfg, nprocs=2)
    t.wait_for_checkpoint()
    workers = t.workers()
    workers[1].suspend()
    assert t.wait(timeout=280) != 0, t.log[-5000:]
    assert "has not responded" not in t.log and "Timed out" in t.log, t.log[-5000:]
    _no_worker_left_and_checkpoints_intact(workers, run)


def _no_worker_left_and_checkpoints_intact(workers: list, run: Path) -> None:
    _, alive = psutil.wait_procs(workers, timeout=60)
    for p in alive:
        p.kill()
    assert not alive, "a worker outlived its launcher"
    found = list_checkpoints(run / "checkpoints")
    assert found
    for d in found:
        verify(d)
