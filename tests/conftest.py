"""Shared test plumbing: run distrain as a real subprocess (one or two CPU processes), fake data, free ports.

Everything a test writes lives under its `tmp_path`; each multi-process test gets its own free port;
subprocesses get OMP_NUM_THREADS=1 so parallel xdist workers do not oversubscribe the two cores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A frame of distrain's own code in a traceback: the package directory only (the checkout itself may
# be called "distrain", and the launcher's frames in its .venv must not count).
OUR_FRAME = re.compile(r'File "' + re.escape(str(REPO / "distrain")) + r'[/\\]')


def traceback_of_ours(text: str) -> bool:
    return OUR_FRAME.search(text) is not None


# Under `nohup` (SIGHUP ignored, which exec'd children inherit) the hang-up tests' workers would
# never see their SIGHUP. A no-op handler keeps the test run immune to a closed terminal, and is
# reset to the default in every child at exec.
if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
    signal.signal(signal.SIGHUP, lambda *_: None)
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))  # the checkout under test, whatever is installed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    # The checkout under test, whatever is installed; threads kept to one per process.
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "TORCH_HOME": env.get("TORCH_HOME", ""), "CUDA_VISIBLE_DEVICES": ""})
    if not env["TORCH_HOME"]:
        env.pop("TORCH_HOME")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_MIXED_PRECISION"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def distrain_cmd(args: list[str], nprocs: int = 1, port: int | None = None) -> list[str]:
    if nprocs == 1:
        return [sys.executable, "-m", "distrain", *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nprocs),
            "--num_machines", "1", "--main_process_port", str(port or free_port()), "--mixed_precision", "no",
            "--dynamo_backend", "no", "-m", "distrain", *args]


def run_distrain(args: list[str], nprocs: int = 1, timeout: float = 300, cwd: Path | None = None,
                 env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run `distrain ARGS` (under `accelerate launch` with `nprocs` CPU processes when > 1)."""
    proc = subprocess.run(distrain_cmd(args, nprocs), cwd=cwd or REPO, env=env or subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"distrain {' '.join(args)} exited {proc.returncode}\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def metrics_events(run_dir: Path, kind: str) -> list[dict]:
    """`kind` records of a run's metrics.jsonl, readable while the run writes (a half-written last line is skipped)."""
    m = Path(run_dir) / "metrics.jsonl"
    if not m.exists():
        return []
    lines = [l for l in m.read_text().splitlines() if l.endswith("}")]
    return [r for r in map(json.loads, lines) if r.get("event") == kind]


def wait_for_first_checkpoint(run_dir: Path, ended, context, timeout: float = 180, poll: float = 0.1) -> dict:
    """The run's first checkpoint event (it is past start-up and mid-training). ``ended()`` returns why the run
    stopped before one (e.g. "training exited 1") or None while it runs; ``context()`` is added to a failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = metrics_events(run_dir, "checkpoint")
        if ev:
            return ev[0]
        why = ended()
        if why:
            pytest.fail(f"{why} before its first checkpoint{context()}")
        time.sleep(poll)
    pytest.fail(f"no checkpoint within {timeout:g} s{context()}")


def load_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """A small CIFAR-10 in the official python layout (500 train / 100 test); read-only for tests."""
    from fakes import write_fake_cifar10

    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar10(root, n_train=500, n_test=100, seed=0)
    return root


def smoke_args(out: Path, **over) -> list[str]:
    """Overrides for a seconds-long run on synthetic data."""
    base = {"output_dir": out, "data.name": "synthetic", "data.max_train_samples": 256, "data.max_test_samples": 64,
            "train.epochs": 1, "train.batch_size": 32, "log.tensorboard": "false", "log.every_steps": 4}
    base.update(over)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local two-node SLURM cluster (slurm/local_cluster.sh), shared by all workers; skips only outside CI."""
    import slurm_helpers as sh

    ok, reason = sh.slurm_available()
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"SLURM is required in CI: {reason}")
        pytest.skip(reason)
    try:
        cluster = sh.acquire_cluster()
    except sh.SlurmError as e:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(str(e))
    yield cluster
    sh.release_cluster()


def cached_run_weights(tmp_path_factory, name: str, args_for, nprocs: int = 1) -> dict:
    """Final weights of an uninterrupted reference run, trained once per pytest session (shared by xdist workers
    under a file lock). ``args_for(run_dir)`` returns the distrain arguments."""
    import fcntl
    import shutil

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # parent: shared by this run's workers
    run = shared / f"ref-{name}"
    with open(f"{run}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (run / "model.safetensors").exists():
            shutil.rmtree(run, ignore_errors=True)
            run_distrain(args_for(run), nprocs=nprocs, check=True)
    return load_weights(run / "model.safetensors")


def train_until_sigterm(args: list[str], run_dir: Path, log_path: Path) -> int:
    """`distrain ARGS` in a session of its own, SIGTERM to its group at its first checkpoint; the
    exit code. Output goes to ``log_path`` (no pipe to fill up); one alive a minute later is killed.
    """
    import signal

    with open(log_path, "w") as log:
        proc = subprocess.Popen(distrain_cmd(args), env=subprocess_env(), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        wait_for_first_checkpoint(
            run_dir, lambda: None if proc.poll() is None else f"training exited {proc.returncode}",
            lambda: "\n" + log_path.read_text()[-4000:])
        os.killpg(proc.pid, signal.SIGTERM)
        return proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
