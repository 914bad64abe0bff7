"""Resuming: which checkpoint to continue from, whether this run may, and restoring explicit objects.

Invariants:
- Compatibility is decided from state.json alone (architecture, classes, global batch, world size,
  the recorded progress), before any tensor file is read.
- `resume=auto` skips damaged checkpoints with a warning; `resume=PATH` refuses a damaged one (exit 2).
- The recorded progress is validated against the data it claims to describe, so a state.json whose
  step was edited (checksum recomputed) cannot silently skip or repeat images.
- After `restore`, the model, optimizer, scheduler, scaler, RNG streams and running totals are exactly
  those of the uninterrupted run at the same step (same world size), or re-derived for another one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from distrain import ckpt_format as fmt
from distrain import resume_policy
from distrain.config import Config
from distrain.data.sampling import EpochPlan, derived_seed
from distrain.errors import UserError
from distrain.optim import apply_optimizer_hparams
from distrain.seeding import seed_everything
from distrain.state import PER_RANK_FIELDS, TrainState


@dataclass
class RunShape:
    """What the resuming run looks like, for the compatibility check."""

    cfg: Config
    world: int
    global_batch: int


class ResumeCheck:
    """Raises UserError when ``meta`` (a checkpoint's state.json) cannot be resumed by this run."""

    def __init__(self, shape: RunShape, log: Callable[[str], None]):
        self.shape, self.log = shape, log

    def __call__(self, meta: dict, path: Path) -> None:
        s, cfg = self.shape, self.shape.cfg
        info = meta["model_info"]
        if info.get("architecture") != cfg.model.name or info.get("num_classes") != cfg.model.num_classes:
            raise UserError(
                f"checkpoint '{path}' holds a {info.get('architecture')} with {info.get('num_classes')} "
                f"classes but the config asks for {cfg.model.name} with {cfg.model.num_classes}; "
                f"use another output_dir or resume=none")
        if meta["global_batch"] != s.global_batch:
            if not cfg.train.allow_batch_change:
                raise UserError(
                    f"checkpoint '{path}' was trained with global batch {meta['global_batch']} "
                    f"({meta['world_size']} processes) but this run has {s.global_batch}; resuming "
                    f"would change the data order and schedule. Keep batch_size x processes x "
                    f"grad_accum_steps, or set train.allow_batch_change=true")
            self.log(f"warning: global batch changes from {meta['global_batch']} to {s.global_batch} "
                     f"(allowed by train.allow_batch_change)")
        elif meta["world_size"] != s.world:
            self.log(f"warning: world size changes from {meta['world_size']} to {s.world} processes "
                     f"with the same global batch {s.global_batch}; resuming (per-rank random states "
                     f"are re-derived)")
        check_progress(meta, path)


def check_progress(meta: dict, path: Path) -> None:
    """The recorded progress must be possible for the split the checkpoint's run trained on."""
    f = Path(path) / fmt.STATE
    st = meta["train_state"]
    for key in ("epoch", "step_in_epoch", "global_step"):
        v = st.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise UserError(f"checkpoint file '{f}' is damaged (train_state.{key} = {v!r})")
    n = meta.get("train_samples")
    if not isinstance(n, int) or n < 1:
        return  # written before the split size was recorded
    steps = math.ceil(n / meta["global_batch"])  # EpochPlan.num_steps for that split and batch
    if st["step_in_epoch"] > steps:
        raise UserError(f"checkpoint file '{f}' is damaged (train_state.step_in_epoch = "
                        f"{st['step_in_epoch']}, but an epoch has {steps} steps)")
    if st["global_step"] < st["epoch"] + st["step_in_epoch"]:
        raise UserError(f"checkpoint file '{f}' is damaged (train_state.global_step = "
                        f"{st['global_step']} is less than its epochs and steps)")
    if meta["config"].get("train", {}).get("allow_batch_change"):
        return  # positions were converted between batch sizes: the totals below need not match
    try:
        seen = sum(rank_record(path, r)["progress"].get("epoch_samples", 0)
                   for r in range(meta["world_size"]))
    except UserError:
        return  # a damaged rank file: `verify` names it next
    expected = min(n, st["step_in_epoch"] * meta["global_batch"])
    if seen != expected:
        raise UserError(f"checkpoint file '{f}' is damaged (train_state.step_in_epoch = "
                        f"{st['step_in_epoch']} means {expected} images of epoch {st['epoch']}, but "
                        f"its ranks recorded {seen})")


def find_resume(resume: str, ckpt_dir: Path, newest_good: Callable, check: ResumeCheck
                ) -> Optional[Path]:
    """The checkpoint to resume from, per the `resume` key, checked for damage."""
    if resume == "none":
        return None
    if resume != "auto":
        d = fmt.resolve_checkpoint_dir(Path(resume))
        if d is None:
            raise UserError(f"config key 'resume': no distrain checkpoint at '{resume}'")
        check(fmt.read_meta(d), d)
        fmt.verify(d)
        return d
    return newest_good(check)


@dataclass
class Targets:
    """The objects a checkpoint is restored into."""

    model: torch.nn.Module  # the bare model (no wrappers)
    optimizer: object
    scheduler: object
    strategy: object  # distributed.Strategy
    cfg: Config
    plan: Callable[[int], EpochPlan]  # epoch -> this run's plan
    train_len: int


def restore(path: Path, t: Targets, log: Callable[[str], None]) -> tuple[TrainState, dict]:
    """Restore everything from ``path``; returns (TrainState, the checkpoint's meta)."""
    path = Path(path)
    meta = fmt.read_meta(path)
    # Before any tensor is read: refuse the config changes this checkpoint cannot continue under.
    for warning in resume_policy.decide_from_meta(meta, t.cfg.to_dict(), f"checkpoint '{path}'").warnings:
        log(f"warning: {warning}")
    sd = fmt.read_tensors(path / "model.safetensors")
    try:
        t.strategy.load_model_state(t.model, sd)
    except RuntimeError as e:
        raise UserError(f"checkpoint '{path}' does not fit the model: {str(e).splitlines()[0]}") from None
    _restore_optimizer(path, meta, t)
    apply_optimizer_hparams(t.optimizer, t.scheduler, t.cfg.train, t.cfg.model)  # this run's values
    state = TrainState.from_record(meta["train_state"])
    state.finished = False  # the (possibly longer) schedule of this run decides
    rank, world = t.strategy.rank, t.strategy.world
    if meta["world_size"] == world and (path / fmt.rank_files(rank)[0]).is_file():
        record = rank_record(path, rank)
        fmt.set_rng_state(record["rng"], fmt.read_tensors(path / fmt.rank_files(rank)[1]))
        for k, v in record["progress"].items():
            if k in PER_RANK_FIELDS:
                setattr(state, k, v)
    else:
        seed_everything(derived_seed(t.cfg.train.seed, rank, state.global_step))
        if rank == 0:
            # The epoch's running totals of all old ranks go to the new rank 0: summed over ranks
            # when the epoch ends, they still describe the whole epoch.
            for r in range(meta["world_size"]):
                if (path / fmt.rank_files(r)[0]).is_file():
                    progress = rank_record(path, r)["progress"]
                    for k in PER_RANK_FIELDS:
                        setattr(state, k, getattr(state, k) + progress.get(k, 0))
    if meta["global_batch"] != t.strategy.global_batch and state.step_in_epoch:
        state.step_in_epoch = _convert_position(state, meta["global_batch"], t, log)
    return state, meta


def _restore_optimizer(path: Path, meta: dict, t: Targets) -> None:
    from distrain.distributed import FSDP_MARKER, ZERO_MARKER

    state_tensors = fmt.read_tensors(path / "optimizer.safetensors")
    try:
        opt = fmt.decode(meta["optimizer"], state_tensors)
        sched = fmt.decode(meta.get("scheduler"), state_tensors)
        scaler = fmt.decode(meta.get("scaler"), state_tensors)
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"checkpoint file '{path / fmt.STATE}' is damaged (bad optimizer record: "
                        f"{e})") from None
    zero, fsdp = opt == ZERO_MARKER, opt == FSDP_MARKER
    for marked, runs, backend in ((fsdp, t.strategy.fsdp is not None, "FSDP"),
                                  (zero, t.strategy.is_deepspeed, "DeepSpeed")):
        if marked != runs:
            how = f"under {backend}" if marked else f"without {backend}"
            raise UserError(f"checkpoint '{path}' was written {how} ({meta['world_size']} processes): "
                            f"its optimizer state only resumes that way; launch it the same way, or "
                            f"start a new output_dir")
    shard = None
    if zero or fsdp:
        what = "DeepSpeed ZeRO optimizer partitions" if zero else "FSDP model and optimizer shards"
        shard = _rank_shard(path, meta, t, what)
    try:
        t.strategy.load_optimizer_state(t.optimizer, opt, shard)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"checkpoint '{path}': optimizer state does not fit this config ({e}); "
                        "the optimizer or frozen layers changed") from None
    if sched is not None:
        t.scheduler.load_state_dict(sched)
    t.strategy.load_scaler_state(scaler)


def _rank_shard(path: Path, meta: dict, t: Targets, what: str) -> dict:
    """This rank's part of partitioned state (ZeRO / FSDP), kept under "zero" in its rank record."""
    rank, world = t.strategy.rank, t.strategy.world
    if meta["world_size"] != world:
        raise UserError(f"checkpoint '{path}' holds {what} of {meta['world_size']} processes; "
                        f"resume it with {meta['world_size']} processes (this run has {world})")
    rec = rank_record(path, rank)
    if "zero" not in rec:
        raise UserError(f"checkpoint file '{path / fmt.rank_files(rank)[0]}' has no {what}")
    return fmt.decode(rec["zero"], fmt.read_tensors(path / fmt.rank_files(rank)[1]))


def rank_record(path: Path, rank: int) -> dict:
    import json

    f = Path(path) / fmt.rank_files(rank)[0]
    try:
        rec = json.loads(f.read_bytes())
        rec["rng"], rec["progress"]  # noqa: B018 - presence check
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint file '{f}' is damaged ({type(e).__name__}: {e})") from None
    return rec


def _convert_position(state: TrainState, old_global_batch: int, t: Targets, log) -> int:
    """The step inside the epoch, with the new global batch, that has used about as many images
    (train.allow_batch_change)."""
    done = min(t.train_len, state.step_in_epoch * old_global_batch)
    plan = t.plan(state.epoch)
    if done >= t.train_len:
        return plan.num_steps
    new_batch = t.strategy.global_batch
    new = done // new_batch
    if new * new_batch != done:
        log(f"warning: with the new global batch, epoch {state.epoch} continues at step {new}; "
            f"{done - new * new_batch} images of it are used twice")
    return new
