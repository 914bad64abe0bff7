"""The seams of the refactored core, in process and fast: the training step and the checkpoint store
against a fake single-process distribution object (no Accelerator, no process group, no subprocess)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from distrain import ckpt_format as fmt
from distrain import resume
from distrain.build import build
from distrain.checkpoint import CheckpointStore, NonFiniteWeights, Snapshot, rank_payload
from distrain.config import load_config
from distrain.distributed import Runtime
from distrain.errors import UserError
from distrain.metrics import MetricsLogger
from distrain.progress import Progress
from distrain.rundir import RunDir
from distrain.state import TrainState
from distrain.trainer import Diverged, Trainer

pytestmark = pytest.mark.timeout(120)


class FakeStrategy:
    """What the loop and the store need of `distributed.Strategy`, for one process on the CPU."""

    rank, world, is_main, is_deepspeed, local_world_size = 0, 1, True, False, 1
    device = torch.device("cpu")
    rt = Runtime("cpu", "no", "fake")
    precision = "no"

    def __init__(self, batch_size: int = 16):
        self.global_batch = batch_size
        self.calls: list[str] = []

    def agree(self, what, fn, main_only=False):
        self.calls.append(what)
        return fn()

    def gather_objects(self, obj):
        return [obj]

    def sum(self, values):
        self.calls.append("sum")
        return [float(v) for v in values]

    def any(self, flag):
        return flag

    def reduce_sum_(self, t):
        return t

    def gather(self, t):
        return t

    def barrier(self):
        pass

    def prepare(self, model, optimizer):
        self.optimizer = optimizer
        return model, optimizer

    def notes(self):
        return []

    @contextlib.contextmanager
    def micro_step(self, model, last):
        yield

    def backward(self, loss):
        loss.backward()

    def optimizer_step(self, model):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    fsdp = None  # no sharding backend: plain state dicts

    def model_state_dict(self, model):
        return model.state_dict()

    def load_model_state(self, model, sd):
        model.load_state_dict(sd, strict=True)

    def lockstep(self, batches):
        return iter(batches)

    def optimizer_state(self, optimizer):
        return optimizer.state_dict()

    def optimizer_shard(self, optimizer):
        return None

    def load_optimizer_state(self, optimizer, state, shard):
        optimizer.load_state_dict(state)

    def scaler_state(self):
        return None

    def load_scaler_state(self, state):
        pass

    def rewrap(self, model):
        return model


def _trainer(tmp_path: Path, *over: str, store: bool = True) -> Trainer:
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "data.name=synthetic",
                             "data.max_train_samples=64", "data.max_test_samples=32",
                             "train.batch_size=16", "train.epochs=1", "log.tensorboard=false",
                             "log.progress=none", "log.every_steps=2", *over])
    s = FakeStrategy(cfg.train.batch_size)
    parts = build(cfg, s)
    path = Path(cfg.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    st = CheckpointStore(path / "checkpoints", log=lambda m: None) if store else None
    info = {"architecture": cfg.model.name, "num_classes": cfg.model.num_classes}
    run = RunDir(path, st, MetricsLogger(path, enabled=True, tensorboard=False), info)
    return Trainer(cfg, s, parts, run, Progress(enabled=False, mode="none"))


def _events(tmp_path: Path, kind: str) -> list[dict]:
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == kind]


def test_one_epoch_moves_the_weights_and_counts_every_image(tmp_path) -> None:
    t = _trainer(tmp_path)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    assert t.train_one_epoch(0) is False
    assert (t.state.step_in_epoch, t.state.global_step) == (4, 4)
    assert t.state.epoch_samples == 64
    assert any(not torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    (rec,) = _events(tmp_path, "train")
    assert rec["samples"] == 64 and rec["step"] == 4
    # polls happened at the log steps (2 and 4), not necessarily every step
    assert t.strategy.calls.count("sum") >= 2


def test_a_non_finite_loss_stops_with_train_lr_named_and_no_checkpoint(tmp_path) -> None:
    t = _trainer(tmp_path, "train.lr=1e30", "train.scheduler=none", "train.momentum=0")
    with pytest.raises(Diverged, match="train.lr"):
        t.fit()
    assert fmt.list_checkpoints(tmp_path / "run" / "checkpoints") == []
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert _events(tmp_path, "diverged")[0]["key"] == "train.lr"


def test_store_round_trip_restores_model_optimizer_and_progress(tmp_path) -> None:
    t = _trainer(tmp_path, "train.epochs=2")
    t.train_one_epoch(0)
    t.state.next_epoch()
    t.save("epoch")
    saved = {k: v.clone() for k, v in t.model.state_dict().items()}
    other = _trainer(tmp_path / "other", "train.epochs=2")
    shape = resume.RunShape(other.cfg, 1, other.strategy.global_batch)
    check = resume.ResumeCheck(shape, print)
    found = t.run.store.newest_good(check)
    targets = resume.Targets(other.model, other.parts.optimizer, other.parts.scheduler, other.strategy,
                             other.cfg, other.plan, len(other.parts.train_split))
    state, meta = resume.restore(found, targets, print)
    assert (state.epoch, state.step_in_epoch, state.global_step) == (1, 0, 4)
    assert all(torch.equal(saved[k], v) for k, v in other.model.state_dict().items())
    assert other.parts.optimizer.state_dict()["state"].keys() == t.parts.optimizer.state_dict()["state"].keys()
    assert meta["train_samples"] == 64


def test_store_refuses_non_finite_weights_and_keeps_the_last_good(tmp_path) -> None:
    t = _trainer(tmp_path)
    t.save("epoch")
    good = t.run.store.list()
    with torch.no_grad():
        next(t.model.parameters()).fill_(float("nan"))
    s = t.strategy
    snap = Snapshot(TrainState(global_step=9), s.model_state_dict(t.model), s.optimizer_state(
        t.parts.optimizer), t.parts.scheduler.state_dict(), None, t.cfg.to_dict(), {}, 1, 16, 64)
    with pytest.raises(NonFiniteWeights):
        t.run.store.save(s, lambda: rank_payload(snap.train_state, None), lambda: snap, "epoch")
    assert t.run.store.list() == good
    assert fmt.read_pointer(t.run.store.dir) == good[-1]


def test_a_tampered_step_is_refused_naming_the_field(tmp_path) -> None:
    t = _trainer(tmp_path, "checkpoint.every_steps=2", "train.epochs=2")
    t.train_one_epoch(0)  # a mid-epoch checkpoint at step 2
    (ckpt,) = [p for p in t.run.store.list() if fmt.read_meta(p)["train_state"]["step_in_epoch"] == 2]
    meta = json.loads((ckpt / fmt.STATE).read_text())
    meta["train_state"]["step_in_epoch"] = 1  # the attacker recomputes the digest
    meta["train_state"]["global_step"] = 1
    meta["digest"] = fmt.meta_digest(meta)
    (ckpt / fmt.STATE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="step_in_epoch"):
        resume.check_progress(fmt.read_meta(ckpt), ckpt)


def test_pointers_resolve_only_inside_their_directory(tmp_path) -> None:
    a, b = tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints"
    (b / "ckpt-000001-step00000001").mkdir(parents=True)
    (a / "ckpt-000001-step00000001").mkdir(parents=True)
    (a / "ckpt-000002-step00000002").symlink_to(b / "ckpt-000001-step00000001")
    for text in ("../../b/checkpoints/ckpt-000001-step00000001",
                 str(b / "ckpt-000001-step00000001"), "ckpt-000002-step00000002"):
        (a / "latest").write_text(text)
        assert fmt.read_pointer(a) is None, text
    (a / "latest").write_text("ckpt-000001-step00000001")
    assert fmt.read_pointer(a) == a / "ckpt-000001-step00000001"


def test_checkpoint_names_past_six_digits_sort_and_resolve(tmp_path) -> None:
    d = tmp_path / "checkpoints"
    names = [fmt.checkpoint_name(s, s) for s in (999_999, 1_000_000, 1_000_001)]
    for n in names:
        (d / n).mkdir(parents=True)
    assert [p.name for p in fmt.list_checkpoints(d)] == names
    assert fmt.resolve_checkpoint_dir(tmp_path) == d / names[-1]
