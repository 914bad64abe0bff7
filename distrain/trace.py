"""`log.trace_samples`: the dataset indices each rank used, in order, under ``<output_dir>/trace/``.

One owner for the file names: ``train-epoch{E}-from{S}-rank{R}.json`` holds the micro-batches rank R
used in epoch E from optimizer step S on, ``eval-epoch{E}-rank{R}.json`` the test images it evaluated.

Invariant: after `trim` at a resume point, every image appears exactly once per epoch across the
files, even when a killed run wrote traces past its last checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from distrain.fsio import atomic_write_bytes

_TRAIN = re.compile(r"^train-epoch(\d+)-from(\d+)-rank(\d+)\.json$")
_EVAL = re.compile(r"^eval-epoch(\d+)-rank(\d+)\.json$")


def train_name(epoch: int, first_step: int, rank: int) -> str:
    return f"train-epoch{epoch}-from{first_step}-rank{rank}.json"


def eval_name(epoch: int, rank: int) -> str:
    return f"eval-epoch{epoch}-rank{rank}.json"


def trace_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "trace"


def write(run_dir: Path, name: str, indices: list) -> None:
    d = trace_dir(run_dir)
    d.mkdir(exist_ok=True)
    (d / name).write_text(json.dumps(indices))


def trim(run_dir: Path, epoch: int, step_in_epoch: int, grad_accum_steps: int) -> None:
    """Make the trace files agree with a resume point (epoch, step_in_epoch): earlier files of that
    epoch keep only the micro-batches before it, files of later work are removed."""
    d = trace_dir(run_dir)
    if not d.is_dir():
        return
    for f in d.iterdir():
        m = _TRAIN.match(f.name)
        if m:
            e, start = int(m.group(1)), int(m.group(2))
            if e > epoch or (e == epoch and start >= step_in_epoch):
                f.unlink(missing_ok=True)
            elif e == epoch:
                try:
                    micro = json.loads(f.read_text())
                except (OSError, ValueError):
                    continue
                keep = (step_in_epoch - start) * grad_accum_steps
                if len(micro) > keep:
                    atomic_write_bytes(f, json.dumps(micro[:keep]).encode())
            continue
        m = _EVAL.match(f.name)
        if m and int(m.group(1)) >= epoch:
            f.unlink(missing_ok=True)
