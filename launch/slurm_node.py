#!/usr/bin/env python3
"""One launcher per node for slurm/train.sbatch: ``srun --ntasks-per-node=1 slurm_node.py -- ARGS``.

Runs inside the srun task, so it reads this node's rank from the task's own environment
(SLURM_NODEID), never from a value the batch shell expanded on the first node (the bug that makes
every node rank 0 in many copied examples). Then it replaces itself (os.execv) with

* ``python -m distrain ARGS`` when the job has one process in all (one node, no GPU or one GPU): no
  launcher process in between, so SLURM's signals reach the trainer directly; or
* ``python -m accelerate.commands.launch --multi_gpu --num_machines N --machine_rank R
  --num_processes N*P --main_process_ip ADDR --main_process_port PORT -m distrain ARGS`` otherwise
  (torch's elastic agent, static rendezvous on ADDR:PORT, P worker processes on this node; on
  CPU-only nodes P=1 and DDP runs over gloo).

SIGUSR1 is blocked from the first line on (before the imports, so the window in which SLURM's
time-limit warning kills the task is only the interpreter's own start-up). A blocked signal stays
blocked across exec and fork and a signal that arrives meanwhile stays pending instead of being
lost: the elastic agent (which would die of SIGUSR1's default action, taking the step down with it)
never sees it, and a worker or a single trainer that is still importing torch when the warning comes
acts on it as soon as distrain.signals.StopSignals installs its handler and unblocks it. (SLURM may
send the warning up to 60 s before the time requested with --signal, so a short job can get it
during start-up; SIG_IGN, used before, dropped it and the job then ran into its time limit.)
SIGTERM/SIGINT are left alone: the agent forwards them to its workers and waits up to 30 s
(TORCH_ELASTIC_SHUTDOWN_TIMEOUT) before killing them; SLURM signals the workers directly too.

Environment it reads (train.sbatch sets the first two; all have fallbacks in distrain/slurm.py, the
one owner of the job reference, rendezvous address and port):
  MASTER_ADDR              rendezvous host; default: DISTRAIN_MASTER_ADDR, else the first node
  MASTER_PORT              rendezvous port; default: DISTRAIN_MASTER_PORT, else 15000 + id % 16000
  DISTRAIN_PROCS_PER_NODE  processes on this node; default: GPUs allocated to this node
                           (SLURM_GPUS_ON_NODE, else CUDA_VISIBLE_DEVICES, else ``nvidia-smi -L``),
                           1 on a CPU-only node
  DISTRAIN_MODULE          the module to run, default ``distrain``

``--dry-run`` prints the decision as JSON instead of exec'ing (tests; checking a cluster's
environment). ``--job-facts`` prints ``JOB_REF MASTER_ADDR MASTER_PORT`` on one line (train.sbatch
reads it) and exits.
"""

from __future__ import annotations

import signal

if __name__ == "__main__":  # first thing: keep SLURM's time-limit warning pending for the trainer
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

# The launcher belongs to its checkout: take distrain (its SLURM facts) from there, whatever else is
# installed.
_CHECKOUT = Path(__file__).resolve().parents[1]
if (_CHECKOUT / "distrain" / "slurm.py").is_file():
    sys.path.insert(0, str(_CHECKOUT))

from distrain import slurm  # noqa: E402
from distrain.slurm import port_for_job  # noqa: E402,F401 - part of this script's interface (tests)


def _checked(fn, *args):
    """A distrain.slurm answer; a malformed variable ends the launcher with a message naming it."""
    try:
        return fn(*args)
    except ValueError as e:
        raise SystemExit(f"slurm_node.py: {e}") from None


def _env_int(env, *names):
    return _checked(slurm.env_int, env, *names)


def _count_gpus(env) -> int:
    n = _env_int(env, "SLURM_GPUS_ON_NODE")
    if n is not None:
        return n
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        devices = [d for d in cvd.split(",") if d.strip() and d.strip() != "NoDevFiles"]
        return len(devices)
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
            return sum(1 for line in out.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            return 0
    return 0


def plan(args: list[str], env=None, python: str = sys.executable) -> dict:
    """What this node runs: node_rank, num_nodes, procs_per_node, master_addr/port and argv."""
    env = os.environ if env is None else env
    local_id = _env_int(env, "SLURM_LOCALID")
    if local_id not in (None, 0):
        raise SystemExit(
            "slurm_node.py: more than one task on this node; run it with "
            "`srun --ntasks-per-node=1` "
            "(it starts all processes of the node itself)"
        )
    num_nodes = _env_int(env, "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES") or 1
    node_rank = _env_int(env, "SLURM_NODEID")
    if node_rank is None:
        node_rank = 0 if num_nodes == 1 else _env_int(env, "SLURM_PROCID")
    if node_rank is None or not 0 <= node_rank < num_nodes:
        raise SystemExit(f"slurm_node.py: no valid node rank (SLURM_NODEID) for a {num_nodes}-node "
                         "step")
    procs = _env_int(env, "DISTRAIN_PROCS_PER_NODE")
    if procs is None:
        procs = max(1, _count_gpus(env))
    if procs < 1:
        raise SystemExit("slurm_node.py: DISTRAIN_PROCS_PER_NODE must be >= 1")
    world = num_nodes * procs
    module = env.get("DISTRAIN_MODULE") or "distrain"
    master_addr = master_port = None
    if world == 1:
        argv = [python, "-m", module, *args]
    else:
        master_addr = env.get("MASTER_ADDR") or slurm.master_addr(env)
        master_port = _env_int(env, "MASTER_PORT")
        if master_port is None:
            master_port = _checked(slurm.master_port, env)
        argv = [python, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_processes", str(world)]
        if num_nodes > 1:
            argv += ["--num_machines", str(num_nodes), "--machine_rank", str(node_rank)]
            argv += ["--main_process_ip", master_addr]
        # distrain passes its own mixed precision to Accelerator (explicit arguments beat the
        # launcher's environment); these two only keep accelerate from warning that they were not
        # given.
        argv += ["--main_process_port", str(master_port), "--mixed_precision", "no",
                 "--dynamo_backend", "no"]
        argv += ["-m", module, *args]
    return {
        "node_rank": node_rank,
        "num_nodes": num_nodes,
        "procs_per_node": procs,
        "world_size": world,
        "master_addr": master_addr,
        "master_port": master_port,
        "argv": argv,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    dry_run = False
    while argv and argv[0] != "--":
        opt = argv.pop(0)
        if opt == "--dry-run":
            dry_run = True
        elif opt == "--job-facts":
            return slurm.main([])
        elif opt in ("-h", "--help"):
            print(__doc__)
            return 0
        else:
            print(f"slurm_node.py: unknown option {opt!r}; usage: slurm_node.py "
                  "[--dry-run | --job-facts] -- ARGS", file=sys.stderr)
            return 2
    if argv and argv[0] == "--":
        argv.pop(0)
    p = plan(argv)
    if dry_run:
        print(json.dumps(p))
        return 0
    host = os.environ.get("SLURMD_NODENAME") or os.uname().nodename
    print(
        f"[slurm_node] node {p['node_rank']}/{p['num_nodes']} ({host}), "
        f"{p['procs_per_node']} process(es) here, "
        f"world {p['world_size']}"
        + (f", rendezvous {p['master_addr']}:{p['master_port']}" if p["master_port"] else "")
        + f": {shlex.join(p['argv'])}",
        file=sys.stderr,
        flush=True,
    )
    os.execv(p["argv"][0], p["argv"])
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
