"""The run directory a training run owns: its lock, its outputs, checked before any training.

Invariants:
- The main process holds the run lock (runlock.py) before it reads or changes anything in the
  directory, and until it exits: a second run on the same directory exits 2 naming the holder, and
  start-up clean-up never deletes a live run's temporaries.
- Every path the run will write (config.yaml, metrics.jsonl, tb/, checkpoints/, model.*, trace/) is
  checked at start-up, so an unwritable one is an exit 2 naming it before any training, not a
  traceback after an epoch.
- `resume=none` over an earlier run starts really fresh: the earlier run's files are moved into
  ``replaced-<time>/`` inside the directory (nothing is deleted) and the move is announced.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from distrain import ckpt_format as fmt
from distrain.checkpoint import CheckpointStore
from distrain.config import Config
from distrain.errors import UserError
from distrain.export import clean_export_temporaries
from distrain.fsio import (TEMP_PREFIX, clean_temporaries, describe_os_error, ensure_writable_dir,
                           ensure_writable_file)
from distrain.runlock import RunLock

FILES = ("config.yaml", "metrics.jsonl", "metrics.csv", "model.safetensors", "model.json",
         "trackers.json")
DIRS = ("checkpoints", "tb", "trace", "mlruns")
KEY = "config key 'output_dir'"


@dataclass
class RunDir:
    path: Path
    store: Optional[CheckpointStore]  # None: nothing is saved (`distrain bench`)
    metrics: object  # metrics.MetricsLogger
    model_info: dict
    lock: Optional[RunLock] = None
    record_traces: bool = True  # log.trace_samples applies (not under `distrain bench`)

    def close(self) -> None:
        self.metrics.close()
        if self.lock is not None:
            self.lock.release()


def claim(cfg: Config, log: Callable[[str], None]) -> RunLock:
    """Main process, before anything else touches the directory: lock it, check every output,
    move an earlier run aside for `resume=none`, clean what killed writers left."""
    path = ensure_writable_dir(Path(cfg.output_dir), KEY)
    lock = RunLock(path).acquire()
    try:
        if cfg.resume == "none":
            _move_earlier_run_aside(path, log)
        check_outputs(path, cfg)
        CheckpointStore(path / "checkpoints").clean_temporaries()
        clean_export_temporaries(path)  # also the names older versions used
        clean_temporaries(path, (TEMP_PREFIX,))
    except BaseException:
        lock.release()
        raise
    return lock


def check_outputs(path: Path, cfg: Config) -> None:
    for name in ("config.yaml", "metrics.jsonl", "model.safetensors", "model.json"):
        ensure_writable_file(path / name, f"{KEY}: '{name}'")
    ensure_writable_dir(path / "checkpoints", f"{KEY}: 'checkpoints'")
    if cfg.log.tensorboard:
        ensure_writable_dir(path / "tb", f"{KEY}: 'tb'")
    if cfg.log.trace_samples:
        ensure_writable_dir(path / "trace", f"{KEY}: 'trace'")


def _move_earlier_run_aside(path: Path, log: Callable[[str], None]) -> None:
    present = [p for p in [*(path / f for f in FILES), *(path / d for d in DIRS)] if p.exists()]
    ckpts = fmt.list_checkpoints(path / "checkpoints")
    if not present or (present == [path / "checkpoints"] and not ckpts):
        return
    dest = path / time.strftime("replaced-%Y%m%d-%H%M%S")
    n = 1
    while dest.exists():
        n += 1
        dest = path / time.strftime(f"replaced-%Y%m%d-%H%M%S-{n}")
    try:
        dest.mkdir()
        for p in present:
            p.rename(dest / p.name)
    except OSError as e:
        raise UserError(f"{KEY}: resume=none cannot move the earlier run in '{path}' aside "
                        f"({describe_os_error(e)}); choose another output_dir") from None
    log(f"resume=none: the earlier run in {path} ({len(ckpts)} checkpoints) was moved to {dest}")
