"""slurm/train.sbatch + launch/slurm_node.py on a real (local, two-node) SLURM cluster, with a stand-in trainer.

The stand-in: each test copies train.sbatch and slurm_node.py into a scratch "repository" that also holds a fake
``distrain`` package (``distrain/__main__.py`` below plus copies of the real distrain/signals.py and slurm.py). The job is
submitted from there, so ``python -m distrain`` (and accelerate's workers, which inherit the working directory)
import the fake: the scripts under test are the real ones, unmodified. The fake records its environment and what
it saw (node rank, rendezvous, parent launcher, signals) as JSON files in its output_dir, and on a stop request
behaves as the engine will: wait "to save", requeue the job itself after SIGUSR1 (rank 0), exit EXIT_STOPPED.

Without slurm these tests skip with the reason (they fail instead when CI=true). The pure-python tests of
slurm_node.py's decisions at the end run everywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slurm_helpers as sh  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))
import slurm_node  # noqa: E402

FAKE_MAIN = r'''
"""Stand-in for `python -m distrain train KEY=VALUE...` (tests/test_slurm_infra.py)."""
import json, os, sys, time
from distrain.signals import EXIT_STOPPED, StopSignals, requeue_slurm_job

def write(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)

args = sys.argv[1:]
assert args and args[0] == "train", args
kv = dict(a.split("=", 1) for a in args[1:] if "=" in a)
out = kv["output_dir"]
os.makedirs(out, exist_ok=True)
restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
rank = int(os.environ.get("RANK", "0"))
world = int(os.environ.get("WORLD_SIZE", "1"))
if kv.get("fake.install_delay"):  # "still importing torch": no handler yet
    write(f"{out}/booting-r{restart}-rank{rank}.json", {"t": time.time()})
    time.sleep(float(kv["fake.install_delay"]))
installed = time.time()
stop = StopSignals().install()
ppid = os.getppid()
with open(f"/proc/{ppid}/cmdline", "rb") as f:
    parent_cmd = f.read().replace(b"\0", b" ").decode().strip()
keys = ("SLURM_JOB_ID", "SLURM_NODEID", "SLURM_PROCID", "SLURMD_NODENAME", "RANK", "LOCAL_RANK", "GROUP_RANK",
        "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")
rec = {"env": {k: os.environ.get(k) for k in keys}, "pid": os.getpid(), "ppid": ppid, "parent_cmd": parent_cmd,
       "argv": args, "restart": restart}
dist = None
if kv.get("fake.dist") == "1" and world > 1:
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo")
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    rec["allreduce"] = t.item()
write(f"{out}/start-r{restart}-rank{rank}.json", rec)
print(f"[fake] rank {rank}/{world} restart {restart} started, pid {os.getpid()}", flush=True)
seconds = float(kv.get("fake.seconds_restarted" if restart else "fake.seconds", "300"))
end = time.monotonic() + seconds
while time.monotonic() < end and not stop.requested:
    time.sleep(0.05)
if stop.requested:
    seen = time.time()
    print(f"[fake] rank {rank}: {stop.describe()}", flush=True)
    time.sleep(float(kv.get("fake.save_seconds", "1")))   # "finish the step and save the checkpoint"
    try:
        os.kill(ppid, 0)
        parent_alive = os.getppid() == ppid
    except OSError:
        parent_alive = False
    ev = {"reason": stop.reason, "requeue": stop.requeue, "parent_alive": parent_alive, "seen": seen,
          "installed": installed, "requeued": False}
    if stop.requeue and rank == 0 and kv.get("fake.requeue", "1") == "1":
        requeue_slurm_job()
        ev["requeued"] = True
    write(f"{out}/stop-r{restart}-rank{rank}.json", ev)
    sys.exit(EXIT_STOPPED)
if dist is not None:
    dist.destroy_process_group()
write(f"{out}/done-r{restart}-rank{rank}.json", {"ok": True})
print(f"[fake] rank {rank} done", flush=True)
'''


# Every wait below is for an event (a record written, a job state reached) and fails at once when
# the job ended without it; the time limit only ends a hang. A slow, shared machine makes these
# tests slower, never red.
HANG_GUARD = 420

# --- fixtures
# --------------------------------------------------------------------------------------------------




@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A scratch repository root: the real scripts, a fake distrain package with the real signals module."""
    (tmp_path / "slurm").mkdir()
    (tmp_path / "launch").mkdir()
    (tmp_path / "distrain").mkdir()
    shutil.copy(REPO / "slurm" / "train.sbatch", tmp_path / "slurm" / "train.sbatch")
    shutil.copy(REPO / "launch" / "slurm_node.py", tmp_path / "launch" / "slurm_node.py")
    for module in ("signals.py", "slurm.py"):
        shutil.copy(REPO / "distrain" / module, tmp_path / "distrain" / module)
    (tmp_path / "distrain" / "__init__.py").write_text("")
    (tmp_path / "distrain" / "__main__.py").write_text(FAKE_MAIN)
    return tmp_path


@pytest.fixture
def job_env(slurm_cluster, tree):
    env = {k: v for k, v in slurm_cluster.env.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    env["DISTRAIN_PYTHON"] = sys.executable  # has torch and accelerate
    env.pop("DISTRAIN_ROOT", None)
    env.pop("DISTRAIN_MASTER_PORT", None)
    env.pop("DISTRAIN_PROCS_PER_NODE", None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU-only nodes: one process per node
    return env


@pytest.fixture
def jobs(job_env):
    """Submitted job ids; whatever is still queued or running at the end is cancelled."""
    ids: list[str] = []
    yield ids
    for j in ids:
        sh.cancel(j, env=job_env)


def _submit(jobs, job_env, tree, *args) -> str:
    job = sh.submit(list(args), env=job_env, cwd=tree)
    jobs.append(job)
    return job


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _log(tree: Path, run_dir: str, ref: str) -> str:
    p = tree / run_dir / f"slurm-{ref}.log"
    return p.read_text(errors="replace") if p.exists() else f"(no {p})"


def _record(tree: Path, run_dir: str, ref: str, env, name: str, timeout: float, job_id=None) -> dict:
    """The stand-in's JSON record `name` in the run directory, once written; with job_id, fail as soon as the job
    ended without it. A failure shows the job, its log and sbatch's output."""
    try:
        return _read(sh.wait_for_file(tree / run_dir / name, timeout=timeout, job_id=job_id, env=env))
    except sh.SlurmError as e:
        pytest.fail(f"{e}{_ctx(tree, run_dir, ref, env)}")


def _ctx(tree: Path, run_dir: str, ref: str, env) -> str:
    """Everything useful when an assertion fails."""
    out = tree / f"slurm-{ref}.out"
    return (
        f"\n--- job: {sh.job_info(ref.split('_')[0], env)}\n--- run-dir log:\n{_log(tree, run_dir, ref)}"
        + (f"\n--- sbatch output:\n{out.read_text(errors='replace')}" if out.exists() else "")
    )


# --- on the cluster
# --------------------------------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.slow
def test_two_nodes_one_launcher_each_distinct_ranks_one_rendezvous(jobs, job_env, tree):
    job = _submit(jobs, job_env, tree, "--nodes", "2", "slurm/train.sbatch", "fake.dist=1", "fake.seconds=0")
    run = f"runs/slurm-{job}"
    info = sh.wait_for(job, {"COMPLETED"}, timeout=HANG_GUARD, env=job_env)
    ctx = _ctx(tree, run, job, job_env)
    assert info["ExitCode"] == "0:0", ctx
    recs = [_read(tree / run / f"start-r0-rank{r}.json") for r in (0, 1)]
    # One launcher (accelerate launch = torch elastic agent) per node, each on its own node...
    assert [r["env"]["SLURMD_NODENAME"] for r in recs] == ["n1", "n2"], ctx
    assert all("accelerate.commands.launch" in r["parent_cmd"] for r in recs), ctx
    assert recs[0]["ppid"] != recs[1]["ppid"]
    assert "--machine_rank 0" in recs[0]["parent_cmd"] and "--machine_rank 1" in recs[1]["parent_cmd"], ctx
    # ...with the node rank from SLURM inside the task (not 0 everywhere), as torch sees it
    # (GROUP_RANK) too.
    assert [r["env"]["SLURM_NODEID"] for r in recs] == ["0", "1"]
    assert [r["env"]["GROUP_RANK"] for r in recs] == ["0", "1"]
    assert [r["env"]["RANK"] for r in recs] == ["0", "1"] and {r["env"]["WORLD_SIZE"] for r in recs} == {"2"}
    # Same rendezvous: the first node, a port derived from the job id; the gloo all-reduce went
    # through.
    assert {r["env"]["MASTER_ADDR"] for r in recs} == {"n1"}
    assert {r["env"]["MASTER_PORT"] for r in recs} == {str(slurm_node.port_for_job(int(job)))}
    assert [r["allreduce"] for r in recs] == [3.0, 3.0]
    # Default run dir keyed by the job id, given after the user's arguments; the log is in it.
    assert recs[0]["argv"] == ["train", "fake.dist=1", "fake.seconds=0", f"output_dir={run}"]
    log = _log(tree, run, job)
    assert "[slurm_node] node 0/2 (n1)" in log and "[slurm_node] node 1/2 (n2)" in log, log
    assert all((tree / run / f"done-r0-rank{r}.json").exists() for r in (0, 1)), ctx


@pytest.mark.slurm
@pytest.mark.slow
def test_usr1_reaches_workers_launcher_survives_job_requeues_itself(jobs, job_env, tree):
    job = _submit(jobs, job_env, tree, "--nodes", "2", "slurm/train.sbatch", "fake.seconds_restarted=0")
    run = f"runs/slurm-{job}"
    for r in (0, 1):
        _record(tree, run, job, job_env, f"start-r0-rank{r}.json", timeout=HANG_GUARD, job_id=job)
    # --full: the batch shell (and srun, tee) get it as well; they must survive it.
    sh.signal_job(job, "USR1", full=True, env=job_env)
    for r in (0, 1):  # the job requeues itself (it stays in the queue): the guard only stops a hang
        _record(tree, run, job, job_env, f"stop-r0-rank{r}.json", timeout=HANG_GUARD, job_id=job)
    ctx = _ctx(tree, run, job, job_env)
    stops = [_read(tree / run / f"stop-r0-rank{r}.json") for r in (0, 1)]
    assert [s["reason"] for s in stops] == ["SIGUSR1", "SIGUSR1"], ctx
    assert all(s["requeue"] for s in stops), ctx
    # The elastic agent (the workers' parent) ignored SIGUSR1 and was still there a second later.
    assert all(s["parent_alive"] for s in stops), ctx
    assert stops[0]["requeued"], ctx
    info = sh.wait_for(job, {"PENDING"}, timeout=HANG_GUARD, env=job_env)
    assert info["Restarts"] >= 1 and info["Reason"] == "BeginTime", ctx
    _wait_for_first_run_to_finish(tree, run, job)
    sh.release(job, env=job_env)
    info = sh.wait_for(job, {"COMPLETED"}, timeout=HANG_GUARD, env=job_env)
    ctx = _ctx(tree, run, job, job_env)
    assert info["Restarts"] == 1 and info["ExitCode"] == "0:0", ctx
    assert all((tree / run / f"done-r1-rank{r}.json").exists() for r in (0, 1)), ctx
    log = _log(tree, run, job)
    # Both runs appended to the same log in the same run dir; the batch shell saw USR1 and kept
    # going.
    assert "job %s (restart 0)" % job in log and "job %s (restart 1)" % job in log, log
    assert "batch shell got SIGUSR1" in log, log


def _wait_for_first_run_to_finish(tree: Path, run: str, job: str, timeout: float = HANG_GUARD) -> None:
    """Release a requeued job only once its first run's batch shell is done: a release while the old
    instance is still completing let the job end FAILED once (under heavy load)."""
    deadline = time.monotonic() + timeout
    while "srun exited with" not in _log(tree, run, job):
        if time.monotonic() > deadline:
            pytest.fail(f"the first run's batch shell did not finish within {timeout:g} s{_log(tree, run, job)}")
        time.sleep(0.2)


@pytest.mark.slurm
@pytest.mark.slow
def test_scontrol_requeue_sends_sigterm_and_the_job_comes_back(jobs, job_env, tree):
    run = "runs/mine"  # a user's output_dir wins over the default, and gets the log
    job = _submit(
        jobs, job_env, tree, "slurm/train.sbatch", f"output_dir={run}", "fake.seconds_restarted=0",
        "fake.save_seconds=2",
    )
    rec = _record(tree, run, job, job_env, "start-r0-rank0.json", timeout=HANG_GUARD, job_id=job)
    # One process in all: no launcher in between, the trainer is the srun task itself.
    assert rec["parent_cmd"].startswith("slurmstepd"), rec
    assert rec["argv"] == ["train", f"output_dir={run}", "fake.seconds_restarted=0", "fake.save_seconds=2"]
    t0 = time.time()
    sh.requeue(job, env=job_env)
    stop = _record(tree, run, job, job_env, "stop-r0-rank0.json", timeout=HANG_GUARD, job_id=job)
    ctx = _ctx(tree, run, job, job_env)
    assert stop["reason"] == "SIGTERM" and not stop["requeue"] and not stop["requeued"], ctx
    assert stop["seen"] - t0 < 30, ctx  # inside KillWait (30 s): the trainer had the time to save
    info = sh.wait_for(job, {"PENDING"}, timeout=HANG_GUARD, env=job_env)
    assert info["Restarts"] == 1, ctx
    _wait_for_first_run_to_finish(tree, run, job)
    sh.release(job, env=job_env)
    info = sh.wait_for(job, {"COMPLETED"}, timeout=HANG_GUARD, env=job_env)
    assert info["Restarts"] == 1 and info["ExitCode"] == "0:0", _ctx(tree, run, job, job_env)
    assert (tree / run / "done-r1-rank0.json").exists()
    # EXIT_STOPPED from the stopped run: it exited on its own after its 2 s "save", not by SLURM's
    # SIGKILL.
    assert "srun exited with 75" in _log(tree, run, job)


@pytest.mark.slurm
@pytest.mark.slow
def test_array_task_run_dir_and_self_requeue_by_array_ref(jobs, job_env, tree):
    array = _submit(jobs, job_env, tree, "--array=3", "slurm/train.sbatch", "fake.seconds_restarted=0")
    ref = f"{array}_3"
    run = f"runs/slurm-{ref}"
    rec = _record(tree, run, ref, job_env, "start-r0-rank0.json", timeout=HANG_GUARD, job_id=array)
    assert (rec["env"]["SLURM_ARRAY_JOB_ID"], rec["env"]["SLURM_ARRAY_TASK_ID"]) == (array, "3")
    job = rec["env"]["SLURM_JOB_ID"]
    sh.signal_job(job, "USR1", env=job_env)  # steps only, as the time-limit signal does
    stop = _record(tree, run, ref, job_env, "stop-r0-rank0.json", timeout=HANG_GUARD, job_id=array)
    assert stop["reason"] == "SIGUSR1" and stop["requeued"], _ctx(tree, run, ref, job_env)  # scontrol requeue A_3
    _wait_for_first_run_to_finish(tree, run, ref)
    sh.release(job, env=job_env)
    info = sh.wait_for(job, {"COMPLETED"}, timeout=HANG_GUARD, env=job_env)
    assert info["Restarts"] == 1, _ctx(tree, run, ref, job_env)
    assert (tree / run / "done-r1-rank0.json").exists()
    assert "batch shell got SIGUSR1" not in _log(tree, run, ref)


@pytest.mark.slurm
@pytest.mark.slow
def test_time_limit_signal_goes_to_the_trainer_not_the_batch_shell(jobs, job_env, tree):
    # A 4-minute limit with the warning asked for 150 s before it. slurmctld sends it once the time
    # left is under the warning time plus 30 s, on a 30 s timer: here 60-90 s in (the test took 63 s
    # in a full CI run), after the step has started and well before the limit. (--time=3 made it due
    # at once: it came within a second in CI, while slurm_node.py started, and the job FAILED; with
    # --time=1 it once came only after the limit.)
    job = _submit(jobs, job_env, tree, "--time=4", "--signal=USR1@150", "slurm/train.sbatch", "fake.requeue=0")
    run = f"runs/slurm-{job}"
    stop = _record(tree, run, job, job_env, "stop-r0-rank0.json", timeout=HANG_GUARD, job_id=job)
    log = _log(tree, run, job)
    assert stop["reason"] == "SIGUSR1" and stop["requeue"], log
    assert "batch shell got SIGUSR1" not in log, log


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, 2])
def test_usr1_during_start_up_waits_for_the_trainers_handler(jobs, job_env, tree, nodes):
    # The time-limit warning can come while the trainers still import torch (SLURM sends it up to 60
    # s early): slurm_node.py blocks SIGUSR1 rather than ignoring it, so it stays pending until
    # StopSignals installs its handler. Ignored, it was lost and the job ran into its time limit;
    # with the default action it killed the task.
    job = _submit(jobs, job_env, tree, f"--nodes={nodes}", "slurm/train.sbatch", "fake.requeue=0",
                  "fake.install_delay=4")
    run = f"runs/slurm-{job}"
    for r in range(nodes):
        _record(tree, run, job, job_env, f"booting-r0-rank{r}.json", timeout=HANG_GUARD, job_id=job)
    sent = time.time()
    sh.signal_job(job, "USR1", env=job_env)  # the job steps' processes, as the time-limit warning
    stops = [_record(tree, run, job, job_env, f"stop-r0-rank{r}.json", timeout=HANG_GUARD, job_id=job)
             for r in range(nodes)]
    ctx = _ctx(tree, run, job, job_env)
    for s in stops:
        assert s["reason"] == "SIGUSR1" and s["requeue"], ctx
        assert s["installed"] > sent, ctx  # it really came before the handler, and was acted on after it
    assert all(s["parent_alive"] for s in stops), ctx  # slurmstepd / the elastic agent survived it too


# --- no cluster needed
# -----------------------------------------------------------------------------------------


def _slurm_env(**kw) -> dict:
    env = {"SLURM_JOB_ID": "12345", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_LOCALID": "0",
           "CUDA_VISIBLE_DEVICES": ""}
    env.update({k: str(v) for k, v in kw.items()})
    return {k: v for k, v in env.items() if v != "None"}


def test_plan_single_process_runs_distrain_directly():
    p = slurm_node.plan(["train", "a=1"], env=_slurm_env(), python="py")
    assert p["world_size"] == 1 and p["argv"] == ["py", "-m", "distrain", "train", "a=1"]


def test_plan_multi_node_uses_this_tasks_node_rank():
    env = _slurm_env(SLURM_JOB_NUM_NODES=3, SLURM_NODEID=2, SLURM_PROCID=2, MASTER_ADDR="gpu01", MASTER_PORT=20001)
    p = slurm_node.plan(["train"], env=env, python="py")
    assert (p["node_rank"], p["num_nodes"], p["procs_per_node"], p["world_size"]) == (2, 3, 1, 3)
    a = p["argv"]
    assert a[:3] == ["py", "-m", "accelerate.commands.launch"] and "--multi_gpu" in a
    opts = dict(zip(a[3:], a[4:]))
    assert opts["--num_processes"] == "3" and opts["--num_machines"] == "3" and opts["--machine_rank"] == "2"
    assert opts["--main_process_ip"] == "gpu01" and opts["--main_process_port"] == "20001"
    assert a[-3:] == ["-m", "distrain", "train"]


def test_plan_counts_gpus_of_this_node():
    p = slurm_node.plan([], env=_slurm_env(SLURM_JOB_NUM_NODES=2, SLURM_NODEID=1, SLURM_GPUS_ON_NODE=4,
                                           MASTER_ADDR="a"), python="py")
    assert (p["procs_per_node"], p["world_size"]) == (4, 8)
    p = slurm_node.plan([], env=_slurm_env(CUDA_VISIBLE_DEVICES="0,1", MASTER_ADDR="a"), python="py")
    assert (p["procs_per_node"], p["world_size"]) == (2, 2)
    assert "--machine_rank" not in p["argv"]  # one node, two GPUs: no multi-node options
    p = slurm_node.plan([], env=_slurm_env(DISTRAIN_PROCS_PER_NODE=3, MASTER_ADDR="a"), python="py")
    assert p["procs_per_node"] == 3


def test_plan_port_from_job_id_and_refuses_two_tasks_per_node():
    p = slurm_node.plan([], env=_slurm_env(SLURM_JOB_NUM_NODES=2, SLURM_NODEID=0, MASTER_ADDR="a"), python="py")
    assert p["master_port"] == slurm_node.port_for_job(12345) == 15000 + 12345 % 16000
    assert all(15000 <= slurm_node.port_for_job(j) < 31000 for j in (0, 1, 15999, 16000, 10**9))
    with pytest.raises(SystemExit, match="ntasks-per-node=1"):
        slurm_node.plan([], env=_slurm_env(SLURM_LOCALID=1), python="py")
    with pytest.raises(SystemExit, match="node rank"):
        slurm_node.plan([], env=_slurm_env(SLURM_JOB_NUM_NODES=2, SLURM_NODEID=5, MASTER_ADDR="a"), python="py")


def test_launcher_blocks_usr1_across_exec(tmp_path):
    """slurm_node.py's exec keeps SIGUSR1 blocked, not ignored, in what it runs (the elastic agent and, by
    inheritance, workers): a warning sent meanwhile stays pending for StopSignals."""
    pkg = tmp_path / "probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(
        "import signal; print(signal.SIGUSR1 in signal.pthread_sigmask(signal.SIG_BLOCK, []), "
        "signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(_slurm_env(DISTRAIN_MODULE="probe"))
    out = subprocess.run([sys.executable, str(REPO / "launch" / "slurm_node.py"), "--"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=HANG_GUARD)
    assert out.returncode == 0 and out.stdout.strip() == "True True", out.stderr
    dry = subprocess.run([sys.executable, str(REPO / "launch" / "slurm_node.py"), "--dry-run", "--", "train"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD)
    assert json.loads(dry.stdout)["argv"][-2:] == ["probe", "train"]


def test_sbatch_script_structure():
    text = (REPO / "slurm" / "train.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(REPO / "slurm" / "train.sbatch")]).returncode == 0
    directives = [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("#SBATCH ")]
    assert "--requeue" in directives and "--ntasks-per-node=1" in directives
    assert "--signal=USR1@120" in directives  # no B:: the step processes get it, not the batch shell
    assert "launch/slurm_node.py" in text and "--ntasks-per-node=1" in text
    out = subprocess.run(["bash", str(REPO / "slurm" / "train.sbatch")], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")})
    assert out.returncode == 2 and "sbatch" in out.stderr


def test_slurm_facts_have_one_owner_and_the_scripts_ask_it():
    """distrain/slurm.py computes the job reference, address and port; train.sbatch asks slurm_node.py for them
    (`--job-facts`) instead of computing them itself."""
    from distrain import slurm

    env = {"SLURM_JOB_ID": "16123"}
    assert (slurm.job_ref(env), slurm.master_port(env), slurm.master_addr(env)) == ("16123", 15123, "127.0.0.1")
    env.update(SLURM_ARRAY_JOB_ID="16100", SLURM_ARRAY_TASK_ID="7", DISTRAIN_MASTER_PORT="20000",
               DISTRAIN_MASTER_ADDR="ib0-n1")
    assert (slurm.job_ref(env), slurm.master_port(env), slurm.master_addr(env)) == ("16100_7", 20000, "ib0-n1")
    assert slurm.job_ref({}) is None and not slurm.in_slurm({}) and slurm.master_port({}) == 29500
    with pytest.raises(ValueError, match="SLURM_JOB_ID='x'"):
        slurm.job_id({"SLURM_JOB_ID": "x"})
    run = [sys.executable, str(REPO / "launch" / "slurm_node.py"), "--job-facts"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DISTRAIN_"))}
    out = subprocess.run(run, env={**clean, **env}, capture_output=True, text=True, timeout=HANG_GUARD)
    assert out.returncode == 0 and out.stdout.split() == ["16100_7", "ib0-n1", "20000"], out.stderr
    out = subprocess.run(run, env=clean, capture_output=True, text=True, timeout=HANG_GUARD)
    assert out.returncode == 2 and "not inside a SLURM job" in out.stderr
    sbatch = (REPO / "slurm" / "train.sbatch").read_text()
    code = "\n".join(line for line in sbatch.splitlines() if not line.lstrip().startswith("#"))
    assert "--job-facts" in code and "16000" not in code and "scontrol show hostnames" not in code
