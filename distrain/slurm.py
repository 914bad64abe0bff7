"""SLURM facts, one owner: the job reference, the rendezvous address and port of a job.

Used by distrain.signals (the job to requeue), launch/slurm_node.py (the rendezvous of the
launchers) and slurm/train.sbatch (the run directory and the log line, through ``slurm_node.py
--job-facts``).

Invariants:

* Import-light: the standard library only (no torch), so that the batch shell and the per-node
  launcher can ask without paying for torch's import.
* Every function takes the environment as an argument (default ``os.environ``) and reads only it
  (plus ``scontrol show hostnames`` for the first host), so every node computes the same address and
  port for one job.
* The port is ``15000 + job id % 16000``: below Linux's ephemeral range (32768+) and above most
  services, and distinct for jobs whose ids differ by less than 16000, so two jobs sharing a node do
  not collide. Requeued jobs keep their id, hence their port. ``DISTRAIN_MASTER_ADDR`` /
  ``DISTRAIN_MASTER_PORT`` force the address (e.g. a faster network interface) and the port.

``python -m distrain.slurm`` prints ``JOB_REF MASTER_ADDR MASTER_PORT`` on one line (what
train.sbatch reads).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Mapping, Optional

PORT_BASE = 15000
PORT_SPAN = 16000
DEFAULT_PORT = 29500  # torch's own default, outside a SLURM job

_JOB_ID_VARS = ("SLURM_JOB_ID", "SLURM_JOBID")


def _env(env: Optional[Mapping[str, str]]) -> Mapping[str, str]:
    return os.environ if env is None else env


def env_int(env: Mapping[str, str], *names: str) -> Optional[int]:
    """The first of ``names`` that is set, as an int; None if none is; ValueError if not an int."""
    for name in names:
        value = (env.get(name) or "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not an integer") from None
    return None


def in_slurm(env: Optional[Mapping[str, str]] = None) -> bool:
    """True inside a SLURM job (batch script, srun step or salloc shell)."""
    env = _env(env)
    return any(env.get(name) for name in _JOB_ID_VARS)


def job_id(env: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """This job's own id (an array task has one of its own too); None outside SLURM."""
    return env_int(_env(env), *_JOB_ID_VARS)


def job_ref(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The job as ``scontrol`` names it: ``"123"``, or ``"123_4"`` for task 4 of array job 123.

    None outside SLURM."""
    env = _env(env)
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return next((env[name] for name in _JOB_ID_VARS if env.get(name)), None)


def port_for_job(job: int) -> int:
    """The rendezvous port for a job: distinct for jobs whose ids differ by less than PORT_SPAN."""
    return PORT_BASE + job % PORT_SPAN


def master_port(env: Optional[Mapping[str, str]] = None) -> int:
    """DISTRAIN_MASTER_PORT, else the job's port (:func:`port_for_job`), else torch's default."""
    env = _env(env)
    forced = env_int(env, "DISTRAIN_MASTER_PORT")
    if forced is not None:
        return forced
    job = job_id(env)
    return port_for_job(job) if job is not None else DEFAULT_PORT


def first_host(env: Optional[Mapping[str, str]] = None) -> str:
    """The job's first node (``scontrol show hostnames $SLURM_JOB_NODELIST``); 127.0.0.1 without."""
    env = _env(env)
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                         text=True, check=True, stdin=subprocess.DEVNULL)
    return out.stdout.split()[0]


def master_addr(env: Optional[Mapping[str, str]] = None) -> str:
    """DISTRAIN_MASTER_ADDR, else the job's first node."""
    env = _env(env)
    return env.get("DISTRAIN_MASTER_ADDR") or first_host(env)


def main(argv: Optional[list] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args:
        print("usage: python -m distrain.slurm   (prints JOB_REF MASTER_ADDR MASTER_PORT)",
              file=sys.stderr)
        return 2
    ref = job_ref()
    if ref is None:
        print("distrain.slurm: not inside a SLURM job (SLURM_JOB_ID is not set)", file=sys.stderr)
        return 2
    try:
        print(ref, master_addr(), master_port())
    except (ValueError, OSError, subprocess.CalledProcessError) as e:
        print(f"distrain.slurm: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
