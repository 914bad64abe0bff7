"""Plain helpers for tests that run jobs on the local SLURM cluster of slurm/local_cluster.sh.

One cluster per user and machine, shared by every test process: pytest-xdist workers and concurrent test
sessions (two checkouts) alike. It lives in ``/tmp/distrain-slurm-<uid>/cluster`` (short on purpose: munge's
socket path must stay under 108 bytes); ``/tmp/distrain-slurm-<uid>/lock`` (flock) serialises starting,
registering and stopping, and each process that uses the cluster leaves a file named after its pid in
``users/``. :func:`acquire_cluster` starts the cluster if it is not up (or was started by another version of
local_cluster.sh and nobody uses it) and registers the caller; :func:`release_cluster` unregisters it and stops
the cluster when no live process uses it any more. Jobs of different sessions just share the two nodes.

Usage in a test module (or a conftest)::

    @pytest.fixture(scope="session")
    def slurm_cluster():
        ok, reason = slurm_available()
        if not ok:
            (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(reason)
        cluster = acquire_cluster()
        yield cluster
        release_cluster()

    job = submit(["--nodes", "2", "slurm/train.sbatch", "train.epochs=1"], env=slurm_cluster.env, cwd=repo)
    info = wait_for(job, {"COMPLETED"}, timeout=120)

There is no accounting database (no sacct): job state comes from ``scontrol show job -o``, which keeps a finished
job for MinJobAge (120 s) after it ends.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

REPO = Path(__file__).resolve().parents[1]
LOCAL_CLUSTER = REPO / "slurm" / "local_cluster.sh"
BASE = Path(f"/tmp/distrain-slurm-{os.getuid()}")
CLUSTER_DIR = BASE / "cluster"

TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
)
REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")


class SlurmError(RuntimeError):
    pass


@dataclass
class Cluster:
    dir: Path
    env: dict  # os.environ plus SLURM_CONF: pass it to every SLURM command and to submit()

    @property
    def log_dir(self) -> Path:
        return self.dir / "log"


# --- availability ----------------------------------------------------------------------------------------------


def _missing_binaries() -> list[str]:
    return [b for b in REQUIRED_BINARIES if shutil.which(b) is None]


def slurm_available(install: bool = True) -> tuple[bool, str]:
    """(True, "") when the local cluster can be used; else (False, why). Installs slurm/munge if missing and allowed.

    Only checks what is needed to start the cluster (root, binaries); :func:`acquire_cluster` reports start-up
    failures with the daemons' logs.
    """
    if os.name != "posix" or not Path("/proc").is_dir():
        return False, "the local SLURM cluster needs Linux"
    if os.geteuid() != 0:
        return False, "the local SLURM cluster needs root (slurmd runs jobs as their user; SlurmUser=root)"
    if not LOCAL_CLUSTER.is_file():
        return False, f"{LOCAL_CLUSTER} is missing"
    missing = _missing_binaries()
    if missing and install:
        try:
            proc = subprocess.run(
                ["bash", str(LOCAL_CLUSTER), "install"], capture_output=True, text=True, timeout=900,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return False, "installing slurm-wlm/munge timed out"
        if proc.returncode != 0:
            return False, f"cannot install slurm-wlm/munge: {(proc.stderr or proc.stdout).strip()[-2000:]}"
        missing = _missing_binaries()
    if missing:
        return False, f"SLURM is not installed (missing {', '.join(missing)}); run: bash slurm/local_cluster.sh install"
    return True, ""


# --- the shared cluster ----------------------------------------------------------------------------------------


@contextmanager
def _locked():
    BASE.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(BASE / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _live_users() -> list[int]:
    users = BASE / "users"
    users.mkdir(exist_ok=True)
    live = []
    for f in users.iterdir():
        try:
            pid = int(f.name)
        except ValueError:
            continue
        if _alive(pid):
            live.append(pid)
        else:
            f.unlink(missing_ok=True)
    return live


def _script_stamp() -> str:
    return hashlib.sha256(LOCAL_CLUSTER.read_bytes()).hexdigest()[:16]


def cluster_env(cluster_dir: Path = CLUSTER_DIR) -> dict:
    env = dict(os.environ)
    env["SLURM_CONF"] = str(cluster_dir / "etc" / "slurm.conf")
    return env


def _run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(LOCAL_CLUSTER), *args], capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _logs_tail(cluster_dir: Path, n: int = 15) -> str:
    out = []
    for f in sorted((cluster_dir / "log").glob("*.log")):
        lines = f.read_text(errors="replace").splitlines()[-n:]
        out.append(f"--- {f}\n" + "\n".join(lines))
    return "\n".join(out)


def acquire_cluster(cluster_dir: Path = CLUSTER_DIR) -> Cluster:
    """Start the shared cluster if needed and register this process as a user of it."""
    with _locked():
        users = [p for p in _live_users() if p != os.getpid()]
        stamp_file = cluster_dir / "stamp"
        up = _run_script("status", str(cluster_dir)).returncode == 0
        deadline = time.monotonic() + 30
        while not up and users and time.monotonic() < deadline:  # in use: give a busy node time to answer
            time.sleep(1)
            up = _run_script("status", str(cluster_dir)).returncode == 0
        stale = not stamp_file.exists() or stamp_file.read_text().strip() != _script_stamp()
        if up and stale and not users:
            _run_script("stop", str(cluster_dir))
            up = False
        if not up:
            _run_script("stop", str(cluster_dir))  # leftovers of a crashed session
            proc = _run_script("start", str(cluster_dir))
            if proc.returncode != 0:
                raise SlurmError(
                    f"cannot start the local SLURM cluster in {cluster_dir}:\n{proc.stderr.strip()}\n"
                    + _logs_tail(cluster_dir)
                )
            stamp_file.write_text(_script_stamp() + "\n")
        (BASE / "users" / str(os.getpid())).touch()
    return Cluster(dir=cluster_dir, env=cluster_env(cluster_dir))


def release_cluster(cluster_dir: Path = CLUSTER_DIR) -> None:
    """Unregister this process; stop the cluster when no live process uses it any more."""
    with _locked():
        (BASE / "users" / str(os.getpid())).unlink(missing_ok=True)
        if not _live_users():
            _run_script("stop", str(cluster_dir))


# --- jobs ------------------------------------------------------------------------------------------------------


def _slurm(args: list[str], env: Optional[dict] = None, cwd=None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, capture_output=True, text=True, env=env or cluster_env(), cwd=cwd, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def submit(args: Iterable[str], env: Optional[dict] = None, cwd=None) -> str:
    """``sbatch --parsable ARGS`` (options, then the script and its arguments); returns the job id."""
    proc = _slurm(["sbatch", "--parsable", *args], env=env, cwd=cwd)
    if proc.returncode != 0:
        raise SlurmError(f"sbatch {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


_FIELD = re.compile(r"(\S+?)=(.*?)(?= \S+?=|$)")


def parse_job_line(line: str) -> dict:
    """One line of ``scontrol show job -o`` as a dict of its Key=Value fields (values may contain spaces)."""
    return {m.group(1): m.group(2) for m in _FIELD.finditer(line.strip())}


def job_infos(job_id: str, env: Optional[dict] = None) -> list[dict]:
    """Every record ``scontrol show job -o ID`` prints (several for an array job); [] once SLURM forgot the job."""
    proc = _slurm(["scontrol", "show", "job", "-o", str(job_id)], env=env)
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return []
        raise SlurmError(f"scontrol show job {job_id} failed: {proc.stderr.strip()}")
    return [parse_job_line(line) for line in proc.stdout.splitlines() if line.strip()]


def job_info(job_id: str, env: Optional[dict] = None) -> Optional[dict]:
    """The job's record, with ``JobState``, ``Restarts`` (int), ``ExitCode`` ("0:0"), ``Reason``, ``NodeList``...

    None once the job is gone (MinJobAge after it ended).
    """
    infos = job_infos(job_id, env)
    if not infos:
        return None
    info = next((i for i in infos if i.get("JobId") == str(job_id)), infos[0])
    info["Restarts"] = int(info.get("Restarts", "0") or 0)
    return info


def wait_for(
    job_id: str, states, timeout: float = 120, env: Optional[dict] = None, poll: float = 0.25
) -> dict:
    """Wait until the job's JobState is one of ``states``; return its record.

    Raises SlurmError at once if the job reaches a terminal state that is not wanted, or disappears, and on timeout.
    """
    states = {states} if isinstance(states, str) else set(states)
    deadline = time.monotonic() + timeout
    info = None
    while True:
        info = job_info(job_id, env)
        if info is None:
            raise SlurmError(f"job {job_id} is gone while waiting for {sorted(states)}")
        state = info.get("JobState")
        if state in states:
            return info
        if state in TERMINAL_STATES:
            raise SlurmError(f"job {job_id} ended {state} (ExitCode={info.get('ExitCode')}) while waiting for {sorted(states)}")
        if time.monotonic() > deadline:
            raise SlurmError(f"job {job_id} still {state} (Reason={info.get('Reason')}) after {timeout:g} s; wanted {sorted(states)}")
        time.sleep(poll)


def release(job_id: str, env: Optional[dict] = None, timeout: float = 60) -> None:
    """Let a requeued job start in 2 s instead of at its delayed BeginTime
    (``scontrol update StartTime=now+2``).

    Waits for the job to be PENDING first (after a requeue it is COMPLETING until its processes are
    gone). Not ``now``: slurmd revokes the old run's job credential with a timestamp in whole seconds
    and refuses a launch whose credential is not newer, so a restart within the same second as the
    requeue was killed ("Killing non-startable batch JobId=...: Job credential revoked" in
    slurmctld.log) and the job ended FAILED.
    """
    wait_for(job_id, {"PENDING"}, timeout=timeout, env=env)
    proc = _slurm(["scontrol", "update", f"JobId={job_id}", "StartTime=now+2"], env=env)
    if proc.returncode != 0:
        raise SlurmError(f"cannot release job {job_id}: {proc.stderr.strip()}")


def signal_job(job_id: str, sig: str = "USR1", full: bool = False, env: Optional[dict] = None) -> None:
    """``scancel --signal=SIG [--full] ID``: without --full the job steps' processes, with it the batch shell too."""
    args = ["scancel", f"--signal={sig}", *(["--full"] if full else []), str(job_id)]
    proc = _slurm(args, env=env)
    if proc.returncode != 0:
        raise SlurmError(f"{' '.join(args)} failed: {proc.stderr.strip()}")


def requeue(job_id: str, env: Optional[dict] = None) -> None:
    """``scontrol requeue ID``: SIGTERM to every process of the job, then back to PENDING with a delayed BeginTime."""
    proc = _slurm(["scontrol", "requeue", str(job_id)], env=env)
    if proc.returncode != 0:
        raise SlurmError(f"scontrol requeue {job_id} failed: {proc.stderr.strip()}")


def cancel(job_id: str, env: Optional[dict] = None) -> None:
    _slurm(["scancel", str(job_id)], env=env)


def wait_for_file(path: Path, timeout: float = 60, poll: float = 0.1, job_id: Optional[str] = None, env=None) -> Path:
    """Wait for a file a job writes; with job_id, fail early if the job ended without writing it."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if job_id is not None:
            info = job_info(job_id, env)
            if info is None or info.get("JobState") in TERMINAL_STATES:
                if path.exists():
                    break
                raise SlurmError(f"job {job_id} ended ({info and info.get('JobState')}) without writing {path}")
        if time.monotonic() > deadline:
            raise SlurmError(f"{path} did not appear within {timeout:g} s")
        time.sleep(poll)
    return path
