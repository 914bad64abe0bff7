"""The checkpoint store: atomic saves of explicit objects, retention by recency and accuracy, clean-up.

A save is a collective: every rank hands its per-rank part (RNG states, running totals, a ZeRO
partition) to the main process in memory, which writes everything into a temporary directory, fsyncs
it, renames it into place (the commit), then moves the `latest` pointer the same way and only then
deletes checkpoints that fell out of retention (renamed out of the namespace first, so a kill in the
middle never leaves a half-deleted checkpoint under a valid name).

Invariants:
- A kill -9 at any instant leaves the previous good checkpoint loadable.
- An I/O failure (disk full, unwritable directory) is a UserError on every rank and leaves the
  committed checkpoints as they were.
- A model holding NaN/inf is never written (`NonFiniteWeights`): a diverged run keeps its last good
  checkpoint as the resume point, and `best` never names a diverged model.
- The store knows nothing about the trainer: `Snapshot` carries the objects, `strategy` the collectives.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from distrain import __version__
from distrain import ckpt_format as fmt
from distrain.ckpt_format import rng_state
from distrain.errors import UserError
from distrain.fsio import (TEMP_PREFIX, atomic_write_bytes, clean_temporaries, describe_os_error,
                           fsync_dir, remove_tree)
from distrain.fsio import write_synced as _write
from distrain.state import TrainState
from distrain.state_dicts import clean_state_dict, non_finite


class NonFiniteWeights(UserError):
    """The model to be saved holds NaN or inf (the run diverged); nothing was written."""


@dataclass
class Snapshot:
    """What one checkpoint holds besides the per-rank parts (built on the main process)."""

    train_state: TrainState
    model_state: dict
    optimizer_state: dict
    scheduler_state: dict
    scaler_state: Optional[dict]
    config: dict
    model_info: dict
    world_size: int
    global_batch: int
    train_samples: int


def rank_payload(state: TrainState, optimizer_shard: Optional[dict]) -> tuple[dict, dict]:
    """This rank's part of a checkpoint: (JSON record, tensors)."""
    rng, tensors = rng_state()
    record = {"rng": rng, "progress": state.per_rank()}
    if optimizer_shard is not None:
        # The backend's per-rank state: a ZeRO partition, or FSDP's model and optimizer shards.
        record["zero"] = fmt.encode(optimizer_shard, tensors, "zero")
    return record, tensors


class CheckpointStore:
    def __init__(self, ckpt_dir: Path, keep_last: int = 2, keep_best: bool = True,
                 log: Callable[[str], None] = print):
        self.dir = Path(ckpt_dir)
        self.keep_last, self.keep_best, self.log = keep_last, keep_best, log

    def list(self) -> list[Path]:
        """Committed checkpoints, oldest first."""
        return fmt.list_checkpoints(self.dir)

    def clean_temporaries(self) -> None:
        """Remove what an interrupted save or delete left behind (main process, run lock held)."""
        clean_temporaries(self.dir, (TEMP_PREFIX, f".{fmt.POINTER}.", f".{fmt.BEST}."))

    # -- save -----------------------------------------------------------------------------------
    def save(self, strategy, payload: Callable[[], tuple[dict, dict]],
             snapshot: Callable[[], Snapshot], reason: str, accuracy: Optional[float] = None) -> Path:
        """Collective: every rank calls it at the same step; any failure fails every rank alike.

        ``payload`` builds this rank's part (see `rank_payload`); ``snapshot`` runs on the main
        process only, inside the write."""
        err = None
        try:
            part = payload()
        except Exception as e:  # noqa: BLE001 - reported on every rank below, not a hang in the gather
            if strategy.world == 1:
                raise
            part, err = None, f"save a checkpoint failed on rank {strategy.rank}: {type(e).__name__}: {e}"
        gathered = strategy.gather_objects((part, err))
        errors = [e for _, e in gathered if e]
        if errors:
            raise RuntimeError(errors[0])
        parts = [p for p, _ in gathered]
        return strategy.agree("save a checkpoint",
                              lambda: self._write(reason, accuracy, snapshot(), parts), main_only=True)

    def _io_error(self, e: BaseException) -> UserError:
        return UserError(f"cannot write a checkpoint in '{self.dir}': {describe_os_error(e)}. Free "
                         f"space or fix permissions; earlier checkpoints are intact")

    def _write(self, reason: str, accuracy: Optional[float], snap: Snapshot, parts: list) -> Path:
        from safetensors import SafetensorError

        model_state = clean_state_dict(snap.model_state)
        bad = non_finite(model_state)
        if bad is not None:
            raise NonFiniteWeights(f"the model's weights hold NaN or inf ('{bad}') at step "
                                   f"{snap.train_state.global_step}; no checkpoint was written")
        seq = 1 + max((fmt.sequence(p) for p in self.list()), default=0)
        name = fmt.checkpoint_name(seq, snap.train_state.global_step)
        tmp = self.dir / f"{TEMP_PREFIX}{name}-{os.getpid()}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        except OSError as e:
            raise self._io_error(e) from None
        try:
            self._write_files(tmp, name, reason, accuracy, snap, model_state, parts)
            os.rename(tmp, self.dir / name)  # the commit
            fsync_dir(self.dir)
            atomic_write_bytes(self.dir / fmt.POINTER, name.encode())
        except (OSError, SafetensorError) as e:
            remove_tree(tmp)
            raise self._io_error(e) from None
        except BaseException:
            remove_tree(tmp)
            raise
        self._retain()
        return self.dir / name

    def _write_files(self, tmp: Path, name: str, reason: str, accuracy: Optional[float],
                     snap: Snapshot, model_state: dict, parts: list) -> None:
        sizes: dict[str, int] = {}
        digests: dict[str, str] = {}

        def put(fname: str, data: bytes) -> None:
            # One file at a time (peak memory ~ one serialized file), hashed in a thread while it is
            # written (both release the GIL).
            with ThreadPoolExecutor(1) as pool:
                digest = pool.submit(fmt.sha256, data)
                _write(tmp / fname, data)
                sizes[fname], digests[fname] = len(data), digest.result()

        put("model.safetensors", fmt.tensor_bytes(model_state))
        del model_state
        state_tensors: dict = {}
        structs = {"optimizer": fmt.encode(snap.optimizer_state, state_tensors, "opt"),
                   "scheduler": fmt.encode(snap.scheduler_state, state_tensors, "sched"),
                   "scaler": fmt.encode(snap.scaler_state, state_tensors, "scaler")
                   if snap.scaler_state is not None else None}
        put("optimizer.safetensors", fmt.tensor_bytes(state_tensors))
        del state_tensors
        for r, (record, tensors) in enumerate(parts):
            rec_name, tensor_name = fmt.rank_files(r)
            put(rec_name, json.dumps(record).encode())
            put(tensor_name, fmt.tensor_bytes(tensors))
        meta = {"format": fmt.FORMAT, "name": name, "reason": reason, "accuracy": accuracy,
                "train_state": snap.train_state.shared(), "config": snap.config,
                "model_info": snap.model_info, "world_size": snap.world_size,
                "global_batch": snap.global_batch, "train_samples": snap.train_samples, **structs, "versions": _versions(),
                "files": sorted(sizes), "sizes": sizes, "sha256": digests, "time": time.time()}
        meta["digest"] = fmt.meta_digest(meta)
        _write(tmp / fmt.STATE, json.dumps(meta).encode())
        fsync_dir(tmp)

    def _retain(self) -> None:
        """Keep the newest `keep_last` and the best by eval accuracy; delete only committed, unneeded ones."""
        found = self.list()
        keep = set(found[-self.keep_last:])
        if self.keep_best:
            best, best_acc = None, None
            for p in found:
                try:
                    a = fmt.read_meta(p).get("accuracy")
                except UserError:
                    continue
                if isinstance(a, (int, float)) and (best_acc is None or a > best_acc):
                    best, best_acc = p, a
            if best is not None:
                keep.add(best)
                try:
                    atomic_write_bytes(self.dir / fmt.BEST, best.name.encode())
                except OSError:
                    pass
        for p in found:
            if p not in keep:
                # Out of the namespace first (atomic), so no half-deleted checkpoint keeps a valid name.
                doomed = self.dir / f"{TEMP_PREFIX}delete-{p.name}"
                try:
                    os.rename(p, doomed)
                except OSError:
                    continue
                remove_tree(doomed)

    # -- find -----------------------------------------------------------------------------------
    def newest_good(self, check: Callable[[dict, Path], None]) -> Optional[Path]:
        """The newest committed checkpoint that verifies; damaged ones are skipped with a warning.

        Newest committed first, not the pointer's: the rename is the commit, so a checkpoint newer
        than the pointer (a kill between the two renames) is complete and preferred. ``check`` judges
        compatibility from state.json alone, before any tensor file is read; it raises to refuse."""
        for d in self.list()[::-1]:
            try:
                meta = fmt.read_meta(d)
            except UserError as e:
                self.log(f"warning: skipping damaged checkpoint {d}: {e}")
                continue
            check(meta, d)
            try:
                fmt.verify(d)
            except UserError as e:
                self.log(f"warning: skipping damaged checkpoint {d}: {e}")
                continue
            return d
        return None


def _versions() -> dict:
    return {"distrain": __version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "numpy": np.__version__, "safetensors": _version("safetensors"),
            "accelerate": _version("accelerate")}


def _version(pkg: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # noqa: BLE001 - only informational
        return None
