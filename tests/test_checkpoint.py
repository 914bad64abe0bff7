"""Checkpoints (issue 3): format and encoding, damage detection, pickle payloads, I/O failures, retention,
compatibility checks, and `eval`/`predict` from a checkpoint directory.

Most tests run `distrain` in this process (`run_inproc`, a few seconds each, no interpreter start-up); the ones
that need a real kill -9 or two processes start subprocesses and are marked slow. Kill-and-resume
equivalence lives in test_resume.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import REPO, distrain_cmd, load_weights, max_abs_diff, read_jsonl, run_distrain, smoke_args, subprocess_env
from distrain import checkpoint as store_mod
from distrain import ckpt_format as ckpt
from distrain.checkpoint import CheckpointStore
from distrain.export import load_for_inference
from distrain.resume import ResumeCheck, RunShape, find_resume
from distrain.config import Config
from distrain.errors import UserError

pytestmark = pytest.mark.timeout(120)

# 192 images, batch 32: 6 optimizer steps per epoch. With every_steps=2 and 2 epochs the saves are at steps
# 2, 4, 6 (epoch end), 8, 10, 12 (final); keep_last=2 keeps 10 and 12 (plus the best, if older).
BASE = {"data.max_train_samples": 192, "data.max_test_samples": 64, "train.epochs": 2, "checkpoint.every_steps": 2,
        "data.augment": "true", "log.progress": "none"}


def args(out: Path, **over) -> list[str]:
    return ["train", *smoke_args(out, **{**BASE, **over})]


# ----------------------------------------------------------------------------------------------------
# In-process runs


def run_inproc(argv: list[str]) -> tuple[int, str, str]:
    """`distrain ARGV` in this process, one thread, fresh Accelerate state; returns (exit code, stdout, stderr)."""
    from accelerate.state import AcceleratorState, GradientState

    from distrain import cli

    threads = torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return rc, out.getvalue(), err.getvalue()


def ok(argv: list[str]) -> str:
    rc, _, err = run_inproc(argv)
    assert rc == 0, err[-4000:]
    return err


def user_error(argv: list[str], *needles: str) -> str:
    """Exit 2, one `distrain CMD: error:` line as the last thing said, naming every needle, no traceback."""
    rc, out, err = run_inproc(argv)
    assert rc == 2, f"exit {rc}\n{err[-4000:]}"
    assert out == "" and "Traceback" not in err, err[-4000:]
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"distrain {argv[0]}: error: "), err[-4000:]
    for n in needles:
        assert str(n) in last, f"{n!r} not in {last!r}"
    return last


def checkpoints(run: Path) -> list[Path]:
    return ckpt.list_checkpoints(run / "checkpoints")


def temporaries(run: Path) -> list[str]:
    d = run / "checkpoints"
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".")) if d.is_dir() else []


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 2-epoch run with every_steps=2 (read-only for tests: copy before damaging)."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    ok(args(run))
    return run


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------------------------
# Encoding: JSON + safetensors only, exact round trips


def test_encode_decode_round_trips_optimizer_scheduler_and_rng() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    for opt in (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True),
                torch.optim.AdamW(model.parameters(), lr=1e-3)):
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
        for _ in range(2):
            model(torch.randn(5, 4)).sum().backward()
            opt.step(), sched.step()
        tensors: dict = {}
        struct = ckpt.encode({"opt": opt.state_dict(), "sched": sched.state_dict()}, tensors, "x")
        # What is stored: JSON text and a safetensors blob, nothing else.
        text = json.dumps(struct)
        blob = ckpt.tensor_bytes(tensors)
        back = ckpt.decode(json.loads(text), ckpt.parse_tensors(blob, Path("x")))
        ref = opt.state_dict()
        assert back["opt"]["param_groups"] == ref["param_groups"]
        assert back["opt"]["state"].keys() == ref["state"].keys()
        for k, st in ref["state"].items():
            for name, v in st.items():
                assert torch.equal(back["opt"]["state"][k][name], v)
        assert back["sched"] == sched.state_dict()
        opt.load_state_dict(back["opt"])  # accepted as is

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state, tensors = ckpt.rng_state()
    state = json.loads(json.dumps(state))
    tensors = ckpt.parse_tensors(ckpt.tensor_bytes(tensors), Path("x"))
    first = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(state, tensors)
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn()) == first


def test_encode_refuses_objects_it_cannot_store_as_data() -> None:
    with pytest.raises(TypeError, match="cannot store"):
        ckpt.encode({"f": lambda: 0}, {}, "x")
    with pytest.raises(ValueError, match="unknown record"):
        ckpt.decode({"__reduce__": ["os.system", "true"]}, {})


def test_checkpoint_contents(trained: Path) -> None:
    found = checkpoints(trained)
    # keep_last=2 (plus the best by eval accuracy when that is the epoch-0 checkpoint)
    assert [p.name for p in found[-2:]] == ["ckpt-000005-step00000010", "ckpt-000006-step00000012"]
    assert [p.name for p in found[:-2]] in ([], ["ckpt-000003-step00000006"])
    best = max(found, key=lambda p: ckpt.read_meta(p)["accuracy"] or -1)
    assert (trained / "checkpoints" / "best").read_text() == best.name
    found = found[-2:]
    assert (trained / "checkpoints" / "latest").read_text() == found[-1].name
    assert temporaries(trained) == []
    d = found[-1]
    assert sorted(p.name for p in d.iterdir()) == ["model.safetensors", "optimizer.safetensors", "rank-00000.json",
                                                    "rank-00000.safetensors", "state.json"]
    meta = ckpt.verify(d)
    assert meta["reason"] == "final" and meta["world_size"] == 1 and meta["global_batch"] == 32
    assert meta["train_state"]["global_step"] == 12 and meta["train_state"]["epoch"] == 2
    assert meta["model_info"]["architecture"] == "cifar10_quick" and meta["model_info"]["num_classes"] == 10
    assert meta["config"]["checkpoint"]["every_steps"] == 2 and meta["config"]["data"]["augment"] is True
    assert {"torch", "distrain", "python", "numpy", "safetensors"} <= set(meta["versions"])
    assert meta["scheduler"] is not None and meta["optimizer"]
    assert meta["files"] == sorted(meta["sha256"]) == sorted(meta["sizes"])
    rank = json.loads((d / "rank-00000.json").read_text())
    assert set(rank["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert rank["progress"]["epoch_samples"] == 0  # saved after the epoch's totals were reported and reset
    # The weights are a plain state_dict that loads strictly, and equal the exported final model.
    from distrain.models import build_model

    sd = load_weights(d / "model.safetensors")
    build_model("cifar10_quick", num_classes=10).load_state_dict(sd, strict=True)
    assert max_abs_diff(sd, load_weights(trained / "model.safetensors")) == 0.0
    # Mid-epoch progress: step 10 is step 4 of epoch 1, with the running totals of 4 x 32 images.
    mid = ckpt.verify(found[0])
    assert mid["reason"] == "every_steps" and mid["train_state"]["epoch"] == 1
    assert mid["train_state"]["step_in_epoch"] == 4
    assert json.loads((found[0] / "rank-00000.json").read_text())["progress"]["epoch_samples"] == 128
    events = [r for r in read_jsonl(trained / "metrics.jsonl") if r["event"] == "checkpoint"]
    # every 2 steps, the epoch end and the end; no duplicate when they fall on the same step
    assert [(r["step"], r["reason"]) for r in events] == [(2, "every_steps"), (4, "every_steps"), (6, "epoch"),
                                                          (8, "every_steps"), (10, "every_steps"), (12, "final")]


# ----------------------------------------------------------------------------------------------------
# Damage: truncated or corrupted files are found, named, skipped (auto) or refused (explicit path)


class _Finder:
    """The resume search of a run directory, as training does it, with its warnings collected."""

    def __init__(self, run: Path, cfg: Config, world: int = 1):
        self.cfg, self.logs = cfg, []
        c = cfg.checkpoint
        self.store = CheckpointStore(run / "checkpoints", c.keep_last, c.keep_best, log=self.logs.append)
        gb = cfg.train.batch_size * world * cfg.train.grad_accum_steps
        self.check = ResumeCheck(RunShape(cfg, world, gb), self.logs.append)

    def find_resume(self):
        return find_resume(self.cfg.resume, self.store.dir, self.store.newest_good, self.check)

    def clean_temporaries(self) -> None:
        self.store.clean_temporaries()

    def _retain(self) -> None:
        self.store._retain()


def _manager(run: Path, resume: str = "auto", **cfg_over) -> _Finder:
    cfg = Config()
    cfg.resume, cfg.model.name, cfg.train.batch_size = resume, "cifar10_quick", 32
    for k, v in cfg_over.items():
        section, key = k.split(".")
        setattr(getattr(cfg, section), key, v)
    return _Finder(run, cfg)


def _truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _corrupt(f: Path) -> None:
    """Same size, a few bytes changed in the middle (parses fine for JSON-ish content: only a checksum sees it)."""
    data = bytearray(f.read_bytes())
    i = len(data) // 2
    data[i : i + 4] = bytes(b ^ 0x55 for b in data[i : i + 4])
    f.write_bytes(bytes(data))


def _corrupt_digit(f: Path) -> None:
    """A still-valid JSON file with one number changed (e.g. a bit flip in a step count)."""
    text = f.read_text()
    i = next(i for i in range(len(text) // 2, len(text)) if text[i].isdigit())
    f.write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1 :])


FILES = ["model.safetensors", "optimizer.safetensors", "rank-00000.safetensors", "rank-00000.json", "state.json"]
DAMAGE = {"truncated": _truncate, "corrupted": _corrupt, "digit": _corrupt_digit}


CASES = [(name, how) for name in FILES for how in ("truncated", "corrupted", "digit", "missing")
         if how != "digit" or name.endswith(".json")]  # a changed digit: still valid JSON, only checksums see it


@pytest.mark.parametrize("name, how", CASES, ids=[f"{n}-{h}" for n, h in CASES])
def test_damaged_file_is_skipped_by_auto_and_refused_by_path(tmp_path, trained, name, how) -> None:
    run = copy_run(trained, tmp_path / "run")
    prev, newest = checkpoints(run)[-2:]
    f = newest / name
    f.unlink() if how == "missing" else DAMAGE[how](f)
    # auto: warn naming the file, take the previous one.
    m = _manager(run)
    assert m.find_resume() == prev
    assert len(m.logs) == 1 and str(newest) in m.logs[0] and name in m.logs[0], m.logs
    # an explicit path: a user error naming the file.
    with pytest.raises(UserError) as e:
        _manager(run, resume=str(newest)).find_resume()
    assert name in str(e.value) and str(newest) in str(e.value)
    # eval of that checkpoint directory: the model file or state.json is what eval reads.
    if name in ("model.safetensors", "state.json"):
        with pytest.raises(UserError, match=name):
            load_for_inference(newest)


def test_all_damaged_means_fresh_start_with_warnings(tmp_path, trained) -> None:
    run = copy_run(trained, tmp_path / "run")
    for d in checkpoints(run):
        _truncate(d / "model.safetensors")
    m = _manager(run)
    assert m.find_resume() is None
    assert len(m.logs) == len(checkpoints(run)) >= 2


@pytest.mark.parametrize("name", ["optimizer.safetensors", "state.json"])
def test_end_to_end_auto_skips_and_path_refuses(tmp_path, trained, name) -> None:
    run = copy_run(trained, tmp_path / "run")
    prev, newest = checkpoints(run)[-2:]
    _corrupt(newest / name)
    err = ok(args(run))
    assert f"warning: skipping damaged checkpoint {newest}" in err and name in err
    assert f"resumed from {prev}" in err
    # Resumed at step 10 and finished again: the final weights equal the undamaged run's.
    assert max_abs_diff(load_weights(run / "model.safetensors"), load_weights(trained / "model.safetensors")) == 0.0
    user_error(args(tmp_path / "other", resume=newest), str(newest / name), "damaged")


# ----------------------------------------------------------------------------------------------------
# Pickle payloads never run


class Payload:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _rewrite_consistently(d: Path, name: str, data: bytes) -> None:
    """Replace a file and fix its size and SHA-256 (and state.json's own digest): an attacker, not an accident."""
    (d / name).write_bytes(data)
    meta = json.loads((d / "state.json").read_text())
    meta["sizes"][name] = len(data)
    meta["sha256"][name] = ckpt.sha256(data)
    meta["digest"] = ckpt.meta_digest(meta)
    (d / "state.json").write_text(json.dumps(meta))


def test_pickle_payloads_never_run(tmp_path, trained) -> None:
    marker = tmp_path / "PWNED"
    torch_zip = tmp_path / "evil.pt"
    torch.save({"x": Payload(marker)}, torch_zip)
    evil = pickle.dumps(Payload(marker))
    from safetensors.torch import save

    a = copy_run(trained, tmp_path / "a")
    a_prev, a_new = checkpoints(a)[-2:]
    # Planted next to the real files: never opened. A safetensors header whose metadata carries a pickle: data.
    shutil.copy(torch_zip, a_new / "optimizer.pt")
    (a_new / "extra.pkl").write_bytes(evil)
    rank_tensors = ckpt.parse_tensors((a_new / "rank-00000.safetensors").read_bytes(), a_new)
    _rewrite_consistently(a_new, "rank-00000.safetensors", save(rank_tensors, metadata={"pickle": evil.hex()}))
    # Consistent-looking checkpoints (sizes and checksums fixed up) whose files are pickles.
    _rewrite_consistently(a_prev, "optimizer.safetensors", torch_zip.read_bytes())
    b = copy_run(trained, tmp_path / "b")
    b_prev, b_new = checkpoints(b)[-2:]
    (b_new / "state.json").write_bytes(evil)
    _rewrite_consistently(b_prev, "rank-00000.json", evil)

    assert _manager(a).find_resume() == a_new
    load_for_inference(a_new)
    user_error(args(tmp_path / "r1", resume=a_prev), str(a_prev / "optimizer.safetensors"), "damaged")
    err = ok(args(a, **{"train.epochs": 3}))  # resumes from a_new and trains a third epoch
    assert f"resumed from {a_new}" in err
    m = _manager(b)
    older = checkpoints(b)[:-2]
    assert m.find_resume() == (older[-1] if older else None)
    assert "state.json" in m.logs[0] and "rank-00000.json" in m.logs[1]
    user_error(args(tmp_path / "r2", resume=b_new), str(b_new / "state.json"), "damaged")
    user_error(args(tmp_path / "r3", resume=b_prev), str(b_prev / "rank-00000.json"), "damaged")
    user_error(["eval", "--checkpoint", b_new], str(b_new / "state.json"))
    assert not marker.exists()
    # The payload is live: torch's unsafe loader would have run it.
    torch.load(torch_zip, weights_only=False)
    assert marker.exists()


def test_no_unsafe_loaders_in_the_checkpoint_code() -> None:
    src = (REPO / "distrain" / "checkpoint.py").read_text()
    for bad in ("import pickle", "pickle.load", "torch.load(", "weights_only=False", "np.load(", "allow_pickle=True",
                "eval(", "yaml.load(", "Unpickler"):
        assert bad not in src, bad


# ----------------------------------------------------------------------------------------------------
# Kill -9 at precise instants of a save (a real SIGKILL in a subprocess)

KILLER = textwrap.dedent("""
    import os, shutil, signal, sys
    import distrain.checkpoint as c
    from distrain import cli
    where, target = sys.argv[1], int(sys.argv[2])
    count = {"save": 0}
    def armed():
        return count["save"] == target
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    orig_save = c.CheckpointStore._write
    def counting(self, *a, **k):
        count["save"] += 1
        return orig_save(self, *a, **k)
    c.CheckpointStore._write = counting
    orig_write = c._write
    def write(path, data):
        if armed() and where == "file" and path.name == "optimizer.safetensors":
            orig_write(path, data[: len(data) // 2])  # a torn write
            die()
        orig_write(path, data)
    c._write = write
    orig_rename = os.rename
    def rename(src, dst):
        if armed() and where == "commit" and str(src).rsplit("/", 1)[-1].startswith(".tmp-ckpt"):
            die()
        orig_rename(src, dst)
    os.rename = rename
    orig_atomic = c.atomic_write_bytes
    def atomic(path, data):
        if armed() and where == "pointer" and path.name == c.fmt.POINTER:
            import tempfile
            tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # its temporary exists
            die()
        orig_atomic(path, data)
    c.atomic_write_bytes = atomic
    orig_rmtree = shutil.rmtree
    def rmtree(p, *a, **k):
        if armed() and where == "retain" and ".tmp-delete-" in str(p):
            os.unlink(os.path.join(p, "model.safetensors"))  # half deleted
            die()
        orig_rmtree(p, *a, **k)
    shutil.rmtree = rmtree
    sys.exit(cli.main(sys.argv[3:]))
""")

# (where, the save it happens in, the checkpoint resume must take: its step)
INSTANTS = [("file", 3, 4), ("commit", 3, 4), ("pointer", 3, 6), ("retain", 3, 6)]
ONE_EPOCH = {"checkpoint.keep_last": 1, "checkpoint.keep_best": "false", "train.epochs": 1}


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> Path:
    """The uninterrupted run of the kill-instant tests."""
    run = tmp_path_factory.mktemp("one_epoch") / "run"
    ok(args(run, **ONE_EPOCH))
    return run


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("where, save, step", INSTANTS, ids=[i[0] for i in INSTANTS])
def test_kill_at_each_instant_of_a_save_leaves_a_good_checkpoint(tmp_path, one_epoch, where, save, step) -> None:
    run = tmp_path / "run"
    argv = args(run, **ONE_EPOCH)
    proc = subprocess.run([sys.executable, "-c", KILLER, where, str(save), *argv], env=subprocess_env(),
                          capture_output=True, text=True, timeout=150)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    left = temporaries(run)
    assert left, "the kill should have left a temporary behind"
    m = _manager(run, **{"checkpoint.keep_last": 1})
    m.clean_temporaries()
    assert temporaries(run) == []
    found = m.find_resume()
    assert found is not None and ckpt.read_meta(found)["train_state"]["global_step"] == step
    assert m.logs == []  # nothing damaged under a valid name
    # And the run goes on from there to the end, where the uninterrupted run ended.
    err = ok(argv)
    assert f"resumed from {found}" in err
    assert max_abs_diff(load_weights(run / "model.safetensors"), load_weights(one_epoch / "model.safetensors")) <= 1e-6


# ----------------------------------------------------------------------------------------------------
# I/O failures: exit 2, a clear message, earlier checkpoints intact


def test_failing_writer_exits_2_and_keeps_earlier_checkpoints(tmp_path, monkeypatch) -> None:
    run = tmp_path / "run"
    calls = {"n": 0}
    real = store_mod._write

    def flaky(path, data):
        calls["n"] += 1
        if calls["n"] > 5:  # the first checkpoint (5 files) goes through, then the disk "fails"
            raise PermissionError(13, "Permission denied", str(path))
        real(path, data)

    monkeypatch.setattr(store_mod, "_write", flaky)
    user_error(args(run), "cannot write a checkpoint", str(run / "checkpoints"), "Permission denied", "intact")
    assert [p.name for p in checkpoints(run)] == ["ckpt-000001-step00000002"]
    ckpt.verify(checkpoints(run)[0])
    assert temporaries(run) == []
    monkeypatch.setattr(store_mod, "_write", real)
    err = ok(args(run, **{"train.epochs": 1}))
    assert f"resumed from {run / 'checkpoints' / 'ckpt-000001-step00000002'}" in err


def test_failing_pointer_update_after_commit(tmp_path, monkeypatch) -> None:
    run = tmp_path / "run"
    real = store_mod.atomic_write_bytes
    calls = {"n": 0}

    def flaky(path, data):
        if path.name == ckpt.POINTER:
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(store_mod, "atomic_write_bytes", flaky)
    user_error(args(run), "No space left on device")
    # The second checkpoint was committed before the pointer failed: both are good, the newest wins.
    names = [p.name for p in checkpoints(run)]
    assert names == ["ckpt-000001-step00000002", "ckpt-000002-step00000004"]
    assert (run / "checkpoints" / "latest").read_text() == names[0]
    assert _manager(run).find_resume() == checkpoints(run)[-1]


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    path.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_disk_full_exits_2_and_keeps_earlier_checkpoints(tmp_path) -> None:
    # One cifar10_quick checkpoint is ~1.2 MB (weights + momentum): the first fits, the second does not.
    with small_tmpfs(tmp_path / "disk", "1800k") as disk:
        run = disk / "run"
        user_error(args(run), "cannot write a checkpoint", str(run / "checkpoints"), "No space left on device",
                   "Free space")
        assert [p.name for p in checkpoints(run)] == ["ckpt-000001-step00000002"]
        assert temporaries(run) == []  # the half-written one is gone, its space freed
        ckpt.verify(checkpoints(run)[0])
        saved = copy_run(run, tmp_path / "copy")
    # With space again, the kept checkpoint resumes.
    err = ok(args(saved, **{"train.epochs": 1}))
    assert f"resumed from {saved / 'checkpoints' / 'ckpt-000001-step00000002'}" in err


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_disk_full_on_two_processes_fails_every_rank_alike(tmp_path) -> None:
    """Rank 0 writes, every rank hears of the failure through the save's agreement: all exit 2, none hangs."""
    with small_tmpfs(tmp_path / "disk", "1800k") as disk:
        run = disk / "run"
        proc = run_distrain(args(run, **{"train.batch_size": 16}), nprocs=2, timeout=150)
        assert proc.returncode == 1, proc.stderr[-4000:]  # the launcher's code when its workers exit 2
        for r in (0, 1):
            lines = [l for l in proc.stderr.splitlines() if l.startswith(f"[rank {r}] distrain train: error: ")]
            assert len(lines) == 1 and "No space left on device" in lines[0], proc.stderr[-4000:]
        assert 'distrain/trainer.py", line' not in proc.stderr and 'distrain/checkpoint.py", line' not in proc.stderr
        assert [p.name for p in checkpoints(run)] == ["ckpt-000001-step00000002"]
        meta = ckpt.verify(checkpoints(run)[0])
        assert meta["world_size"] == 2
        assert {"rank-00000.json", "rank-00000.safetensors", "rank-00001.json", "rank-00001.safetensors"} <= set(meta["files"])
        assert temporaries(run) == []


RANK1_FAILS = textwrap.dedent("""
    import os, sys
    import distrain.checkpoint as c
    from distrain import cli
    real, calls = c.rng_state, {"n": 0}
    def rng_state():
        calls["n"] += 1
        if os.environ.get("RANK") == "1" and calls["n"] == 2:
            raise ValueError("injected failure")
        return real()
    c.rng_state = rng_state
    sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_failure_on_another_rank_during_a_save_fails_every_rank(tmp_path) -> None:
    """Rank 1 fails preparing its part of the second save: no hang in the gather, every rank stops with its error."""
    script = tmp_path / "rank1_fails.py"
    script.write_text(RANK1_FAILS)
    run = tmp_path / "run"
    cmd = distrain_cmd(args(run, **{"train.batch_size": 16}), nprocs=2)
    i = cmd.index("-m", cmd.index("--dynamo_backend"))
    cmd[i : i + 2] = [str(script)]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=150)
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert proc.stderr.count("RuntimeError: save a checkpoint failed on rank 1: ValueError: injected failure") == 2, \
        proc.stderr[-4000:]
    assert [p.name for p in checkpoints(run)] == ["ckpt-000001-step00000002"]
    assert temporaries(run) == []


# ----------------------------------------------------------------------------------------------------
# Retention and temporaries


def _fake_checkpoint(d: Path, seq: int, step: int, accuracy) -> Path:
    p = d / f"ckpt-{seq:06d}-step{step:08d}"
    p.mkdir(parents=True)
    meta = {"format": ckpt.FORMAT, "accuracy": accuracy, "files": [], "sizes": {}, "sha256": {}, "model_info": {},
            "world_size": 1, "global_batch": 32, "train_state": {}, "config": {}, "optimizer": {}}
    meta["digest"] = ckpt.meta_digest(meta)
    (p / "state.json").write_text(json.dumps(meta))
    return p


@pytest.mark.parametrize("keep_best", [True, False])
def test_retention_keeps_newest_and_best(tmp_path, keep_best) -> None:
    d = tmp_path / "run" / "checkpoints"
    accs = [None, 0.5, None, 0.9, None, 0.7, None, None]
    made = [_fake_checkpoint(d, i + 1, 10 * (i + 1), a) for i, a in enumerate(accs)]
    m = _manager(tmp_path / "run", **{"checkpoint.keep_last": 3, "checkpoint.keep_best": keep_best})
    m._retain()
    kept = set(checkpoints(tmp_path / "run"))
    assert kept == set(made[-3:]) | ({made[3]} if keep_best else set())
    if keep_best:
        assert (d / "best").read_text() == made[3].name
    assert temporaries(tmp_path / "run") == []


def test_clean_temporaries_removes_only_leftovers(tmp_path) -> None:
    d = tmp_path / "run" / "checkpoints"
    keep = _fake_checkpoint(d, 1, 2, None)
    (d / ".tmp-ckpt-000002-step00000004-123").mkdir()
    (d / ".tmp-ckpt-000002-step00000004-123" / "model.safetensors").write_bytes(b"x" * 10)
    (d / ".tmp-delete-ckpt-000000-step00000001").mkdir()
    (d / ".latest.abc.tmp").write_text("x")
    (d / ".best.abc.tmp").write_text("x")
    (d / "latest").write_text(keep.name)
    _manager(tmp_path / "run").clean_temporaries()
    assert sorted(p.name for p in d.iterdir()) == [keep.name, "latest"]


# ----------------------------------------------------------------------------------------------------
# Compatibility: decided from state.json before any tensor is read


def test_other_architecture_or_classes_fail_before_any_tensor_is_read(tmp_path, trained, monkeypatch) -> None:
    def no(*a, **k):
        raise AssertionError("a tensor file was read")

    monkeypatch.setattr(ckpt, "read_tensors", no)
    monkeypatch.setattr(ckpt, "parse_tensors", no)
    monkeypatch.setattr(ckpt, "verify", no)
    run = copy_run(trained, tmp_path / "run")
    user_error(args(run, **{"model.num_classes": 5}), str(run / "checkpoints"), "10 classes", "5", "resume=none")
    user_error(args(tmp_path / "r2", resume=checkpoints(trained)[-1], **{"model.num_classes": 7}), "10 classes")
    for resume in ("auto", str(checkpoints(run)[0])):
        with pytest.raises(UserError, match="holds a cifar10_quick with 10 classes but the config asks for vgg16"):
            _manager(run, resume=resume, **{"model.name": "vgg16"}).find_resume()


def test_changed_global_batch_needs_allow_batch_change(tmp_path) -> None:
    run = tmp_path / "run"
    ok(args(run, **{"train.max_steps": 3}))  # stops (and saves) at step 3 of epoch 0
    assert ckpt.verify(checkpoints(run)[-1])["train_state"]["step_in_epoch"] == 3
    user_error(args(run, **{"train.batch_size": 16}), "global batch 32", "16", "train.allow_batch_change=true")
    user_error(args(run, **{"train.grad_accum_steps": 2}), "global batch 32", "64")
    err = ok(args(run, **{"train.batch_size": 16, "train.allow_batch_change": "true"}))
    assert "warning: global batch changes from 32 to 16" in err and "resumed from" in err
    # 3 steps x 32 = 96 images = 6 steps x 16: epoch 0 continues at step 6 of 12, every image once.
    # The first run reported its partial epoch 0 (96 images); the resumed one the whole of it, then epoch 1.
    train = [(r["epoch"], r["step"], r["samples"]) for r in read_jsonl(run / "metrics.jsonl") if r["event"] == "train"]
    assert train == [(0, 3, 96), (0, 9, 192), (1, 21, 192)]


# ----------------------------------------------------------------------------------------------------
# eval and predict accept checkpoint directories


def test_eval_and_predict_from_checkpoint_directories(tmp_path, trained) -> None:
    newest = checkpoints(trained)[-1]
    rc, out, err = run_inproc(["eval", "--checkpoint", newest, "--json"])
    assert rc == 0, err
    from_ckpt = json.loads(out)
    rc, out, _ = run_inproc(["eval", "--checkpoint", trained / "model.safetensors", "--json"])
    exported = json.loads(out)
    assert from_ckpt["samples"] == exported["samples"] == 64
    assert from_ckpt["accuracy"] == exported["accuracy"] and from_ckpt["loss"] == pytest.approx(exported["loss"], abs=1e-6)
    assert from_ckpt["checkpoint"] == str(newest)
    # A run directory without an exported model (killed before the end): its newest checkpoint.
    run = copy_run(trained, tmp_path / "run")
    (run / "model.safetensors").unlink()
    rc, out, err = run_inproc(["eval", "--checkpoint", run, "--json"])
    assert rc == 0 and json.loads(out)["checkpoint"].endswith(newest.name), err
    # predict, from the checkpoint directory and from the checkpoints/ folder.
    from PIL import Image

    img = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(img)
    preds = []
    for src in (newest, run / "checkpoints", trained):
        rc, out, err = run_inproc(["predict", "--checkpoint", src, "--json", "--topk", "3", img])
        assert rc == 0, err
        preds.append(json.loads(out)["predictions"][0])
    assert preds[0] == preds[1]
    assert preds[0]["class"] == preds[2]["class"] and preds[0]["probability"] == pytest.approx(preds[2]["probability"], abs=1e-6)
    # A damaged checkpoint directory: exit 2 naming the file.
    _truncate(run / "checkpoints" / newest.name / "model.safetensors")
    user_error(["eval", "--checkpoint", run / "checkpoints" / newest.name], "model.safetensors", "truncated")
