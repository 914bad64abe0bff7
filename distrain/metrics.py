"""Run records: `metrics.jsonl` (one JSON object per line) and TensorBoard scalars, main process only.

Lines are appended and flushed one at a time, so a crash loses at most the line being written; a
resumed run appends to the same file.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def log(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        rec = {"event": event, **{k: _plain(v) for k, v in fields.items()}, "time": round(time.time(), 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()

    def scalars(self, step: int, **values: float) -> None:
        if self.tb is None:
            return
        for k, v in values.items():
            if v is not None:
                self.tb.add_scalar(k, _plain(v), step)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def read_metrics(path: Path) -> list[dict]:
    """All complete records of a metrics.jsonl (a torn last line from a crash is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts, rows = true class, columns = predicted class."""
    k = target * num_classes + pred
    return torch.bincount(k, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_accuracy(cm: torch.Tensor) -> list[Optional[float]]:
    totals = cm.sum(1)
    return [(cm[i, i] / totals[i]).item() if totals[i] > 0 else None for i in range(cm.shape[0])]
