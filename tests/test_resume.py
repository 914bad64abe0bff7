"""Kill -9 and resume (issue 3): a run killed at random moments, or in the middle of a checkpoint write, then
resumed with `resume=auto`, reaches the same final weights as the run that was never stopped (CPU,
augmentation on, one and two processes), uses every training image exactly once per epoch (traces), and
reports whole-epoch numbers. Also: another world size with the same global batch resumes (with a warning),
and a mid-epoch resume reads only the batches that are left.

Kills are real SIGKILLs of every process of the run: `accelerate launch` starts its workers in sessions of
their own, so the launcher's process group alone would miss them; `kill_all` kills the workers and the group.
Set DISTRAIN_KILL_SEED to replay the random kill moments of a failure (the seed is in every assertion message).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import distrain_cmd, free_port, load_weights, max_abs_diff, read_jsonl, run_distrain, smoke_args, subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SEED = int(os.environ.get("DISTRAIN_KILL_SEED", random.SystemRandom().randrange(10**6)))
GLOBAL_BATCH = 32
# 192 images, global batch 32: 6 steps per epoch, 3 epochs; a checkpoint every 2 steps (and at epoch ends).
KW = {"data.max_train_samples": 192, "data.max_test_samples": 64, "train.epochs": 3, "checkpoint.every_steps": 2,
      "data.augment": "true", "log.progress": "none", "log.trace_samples": "true", "train.seed": 3}
N_TRAIN, EPOCHS = 192, 3


def train_args(out: Path, nprocs: int = 1, **over) -> list[str]:
    return ["train", *smoke_args(out, **{**KW, "train.batch_size": GLOBAL_BATCH // nprocs, **over})]


def _shared_root(tmp_path_factory) -> Path:
    """A directory all xdist workers of this session share (the session's own when not under xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared_run(tmp_path_factory, name: str, nprocs: int) -> Path:
    """An uninterrupted reference run, made once per test session whichever worker needs it first."""
    from filelock import FileLock

    root = _shared_root(tmp_path_factory)
    out = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (out / "model.safetensors").is_file():
            shutil.rmtree(out, ignore_errors=True)
            run_distrain(train_args(out, nprocs), nprocs=nprocs, check=True, timeout=200)
    return out


@pytest.fixture(scope="session")
def reference1(tmp_path_factory) -> Path:
    return shared_run(tmp_path_factory, "resume-reference-1proc", 1)


@pytest.fixture(scope="session")
def reference2(tmp_path_factory) -> Path:
    return shared_run(tmp_path_factory, "resume-reference-2proc", 2)


# ----------------------------------------------------------------------------------------------------
# Starting and killing runs


class Run:
    def __init__(self, out: Path, nprocs: int = 1, **over):
        self.out, self.nprocs = out, nprocs
        out.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(out.parent / f"{out.name}-{time.monotonic_ns()}.log", "w")
        self.proc = subprocess.Popen(distrain_cmd(train_args(out, nprocs, **over), nprocs, port=free_port()),
                                     env=subprocess_env(), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.base = self.saves()  # metrics.jsonl is appended to by every run of the directory

    def saves(self) -> int:
        """Checkpoints this run directory has seen committed (rank 0 logs each one)."""
        try:
            return (self.out / "metrics.jsonl").read_text().count('"event": "checkpoint"') - getattr(self, "base", 0)
        except OSError:
            return 0

    def temporaries(self) -> list[str]:
        try:
            return [n for n in os.listdir(self.out / "checkpoints") if n.startswith(".tmp-")]
        except OSError:
            return []

    def wait_until(self, cond, timeout: float = 120, poll: float = 0.002) -> bool:
        """Poll ``cond`` until it holds (True) or the run ended first (False)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(poll)
        raise AssertionError(f"timed out waiting; seed {SEED}")

    def kill_all(self) -> None:
        """SIGKILL every process of the run at once: the workers (own sessions) and the launcher's group."""
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        _, alive = psutil.wait_procs(procs, timeout=30)
        assert not alive, f"processes survived the kill: {alive}"
        self.log.close()

    def kill_during_save(self, after: int) -> bool:
        """Kill as soon as a checkpoint write is under way once ``after`` saves are committed; False if it ended first."""
        hit = self.wait_until(lambda: self.saves() >= after and bool(self.temporaries()))
        self.kill_all()
        return hit

    def kill_at_random(self, rng: random.Random) -> bool:
        """Kill after a random number of saves plus a random delay (mostly between saves, sometimes in one)."""
        target = rng.randint(1, 7)
        hit = self.wait_until(lambda: self.saves() >= target)
        if hit:
            time.sleep(rng.uniform(0, 0.4))
        self.kill_all()
        return hit

    def text(self) -> str:
        self.log.close()
        return Path(self.log.name).read_text()


def resume(out: Path, nprocs: int = 1, **over) -> str:
    proc = run_distrain(train_args(out, nprocs, **over), nprocs=nprocs, timeout=200)
    assert proc.returncode == 0, f"seed {SEED}\n{proc.stderr[-4000:]}"
    return proc.stderr


# ----------------------------------------------------------------------------------------------------
# What a resumed run must match


def epoch_indices(run: Path, epoch: int, rank: int | None = None) -> list[int]:
    """The training images of an epoch in the order used, from the trace files (all ranks when rank is None)."""
    files = [f for f in (run / "trace").glob(f"train-epoch{epoch}-from*-rank*.json")
             if rank is None or f.name.endswith(f"-rank{rank}.json")]
    files.sort(key=lambda f: (int(f.name.split("-rank")[1][:-5]), int(f.name.split("-from")[1].split("-")[0])))
    return [i for f in files for micro in json.loads(f.read_text()) for i in micro]


def last_train_records(run: Path) -> dict[int, dict]:
    return {r["epoch"]: r for r in read_jsonl(run / "metrics.jsonl") if r["event"] == "train"}


def assert_same_as(run: Path, ref: Path, nprocs: int, tol: float = 0.0) -> None:
    diff = max_abs_diff(load_weights(run / "model.safetensors"), load_weights(ref / "model.safetensors"))
    assert diff <= max(tol, 1e-6), f"final weights differ by {diff}; seed {SEED}"
    got, want = last_train_records(run), last_train_records(ref)
    assert sorted(got) == list(range(EPOCHS))
    for e in range(EPOCHS):
        # Whole-epoch numbers, also for an epoch that was interrupted: per-rank running totals survive.
        assert got[e]["samples"] == N_TRAIN, (e, got[e], SEED)
        assert got[e]["loss"] == pytest.approx(want[e]["loss"], abs=max(tol, 1e-6)), (e, SEED)
        # Every image exactly once per epoch, in the uninterrupted run's order.
        assert sorted(epoch_indices(run, e)) == list(range(N_TRAIN)), (e, SEED)
        if tol == 0.0:
            for r in range(nprocs):
                assert epoch_indices(run, e, r) == epoch_indices(ref, e, r), (e, r, SEED)


# ----------------------------------------------------------------------------------------------------
# One process


def test_kill_during_saves_and_resume_gives_the_same_weights(tmp_path, reference1) -> None:
    out = tmp_path / "run"
    first, second = Run(out), None
    hits = [first.kill_during_save(1)]
    second = Run(out)  # resumes from what the first left, and is killed in its own third save
    hits.append(second.kill_during_save(3))
    assert all(hits), (first.text()[-2000:], second.text()[-2000:])
    assert first.proc.returncode == second.proc.returncode == -signal.SIGKILL
    err = resume(out)
    assert "resumed from" in err
    assert not [n for n in os.listdir(out / "checkpoints") if n.startswith(".")]
    assert_same_as(out, reference1, 1)


def test_kill_at_random_moments_and_resume_gives_the_same_weights(tmp_path, reference1) -> None:
    rng = random.Random(SEED)
    out = tmp_path / "run"
    Run(out).kill_at_random(rng)
    err = resume(out)
    assert "resumed from" in err
    assert_same_as(out, reference1, 1)


def test_one_process_checkpoint_resumes_on_two_processes(tmp_path, reference1) -> None:
    out = tmp_path / "run"
    run = Run(out)
    assert run.kill_during_save(3), run.text()[-3000:]
    err = resume(out, nprocs=2)
    assert "warning: world size changes from 1 to 2 processes with the same global batch 32" in err
    # Same images per step; only float summation order differs between one and two processes (~2e-7 measured).
    assert_same_as(out, reference1, 2, tol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Two processes


@pytest.mark.timeout(300)
def test_two_processes_killed_at_random_resume_to_the_same_weights(tmp_path, reference2) -> None:
    rng = random.Random(SEED + 1)
    out = tmp_path / "run"
    run = Run(out, nprocs=2)
    assert run.kill_at_random(rng), run.text()[-3000:]
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    err = resume(out, nprocs=2)
    assert "resumed from" in err and "warning: " not in err
    assert_same_as(out, reference2, 2)
    # The same checkpoint on one process with the same global batch: a warning, then the same training.
    err = resume(copy, nprocs=1)
    assert "warning: world size changes from 2 to 1 processes with the same global batch 32" in err
    assert_same_as(copy, reference2, 1, tol=1e-5)


# ----------------------------------------------------------------------------------------------------
# A mid-epoch resume reads only what is left


@pytest.mark.parametrize("loader", ["device", "dataloader"])
def test_mid_epoch_start_yields_exactly_the_remaining_batches_and_reads_nothing_else(loader, monkeypatch) -> None:
    from distrain.config import Config
    from distrain.data.pipeline import InputPipeline
    from distrain.build import pipeline_spec, split_of
    from distrain.data.sampling import EpochPlan

    cfg = Config()
    cfg.data.name, cfg.data.max_train_samples, cfg.data.augment, cfg.data.loader = "synthetic", 100, True, loader
    cfg.train.batch_size, cfg.train.grad_accum_steps, cfg.data.num_workers = 8, 2, 0
    split = split_of(cfg, train=True)
    read: list[int] = []
    if loader == "dataloader":
        from distrain.data import pipeline

        real_item = pipeline._InMemory.__getitem__

        def getitem(self, i):
            read.append(int(i[1] if isinstance(i, tuple) else i))  # (epoch, index) or index
            return real_item(self, i)

        monkeypatch.setattr(pipeline._InMemory, "__getitem__", getitem)
    pipe = InputPipeline(split, pipeline_spec(cfg, cfg.train.batch_size), torch.device("cpu"), rank=1, world_size=2,
                         train=True)
    assert pipe.mode == loader and pipe.augment
    if loader == "device":
        real = pipe._gather

        def gather(idx):
            read.extend(idx.tolist())
            return real(idx)

        monkeypatch.setattr(pipe, "_gather", gather)
    plan = EpochPlan(len(split), 8, 2, 1, 2, seed=0, epoch=4)
    pipe.set_epoch(plan)
    full = list(pipe)
    start_step = 2
    start = start_step * 2  # micro-batches
    read.clear()
    pipe.set_epoch(plan, start_micro=start)
    tail = list(pipe)
    assert len(tail) == len(full) - start
    for (x, y, i), (xf, yf, i_f) in zip(tail, full[start:]):
        assert torch.equal(i, i_f) and torch.equal(y, yf) and torch.equal(x, xf)  # augmentation included
    expected = [int(i) for m in range(start, plan.num_micro_batches) for i in plan.micro_indices(m)]
    assert sorted(read) == sorted(expected)  # nothing of the skipped batches was read
