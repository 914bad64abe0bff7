"""Run records: `metrics.jsonl` (one JSON object per line) and TensorBoard scalars, main process only.

Lines are appended and flushed one at a time, so a crash loses at most the line being written; a
resumed run appends to the same file.

TensorBoard (`<run>/tb/`, one event file per start of the run, all in that folder) gets, by tag:
scalars `train/loss`, `train/lr`, `train/images_per_s` (every log.every_steps steps), `train/epoch_loss`,
`train/epoch_accuracy`, `eval/loss`, `eval/accuracy`, `eval_per_class/<class>` (each evaluation),
`gpu/memory_allocated_mib`, `gpu/max_memory_allocated_mib`, `gpu/memory_reserved_mib` (CUDA only),
`hparam/final_accuracy`, `hparam/best_accuracy`, `hparam/final_loss` (at the end); images
`train/augmented_batch` (the first training batch, once) and `eval/confusion_matrix` (each evaluation);
text `run` (the start banner) and `config` (the resolved config); and the HPARAMS tab (flat config and
world size, global batch, device, precision, against the final metrics). The x axis is the optimizer step.
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
            if isinstance(v, torch.Tensor):
                v = v.item()
            if v is not None:
                self.tb.add_scalar(k, float(v), step)  # NaN/inf kept: TensorBoard shows a diverged run as such

    # -- TensorBoard views (issue 7); all no-ops off the main process or with log.tensorboard=false --------
    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def config(self, cfg, step: int = 0, note: str = "") -> None:
        """The resolved config as text (YAML in a code block; TensorBoard renders markdown)."""
        if self.tb is None:
            return
        body = "\n".join("    " + line for line in cfg.to_yaml().splitlines())
        self.tb.add_text("config", (note + "\n\n" if note else "") + body, step)

    def image_grid(self, tag: str, images: torch.Tensor, mean, std, step: int = 0, max_images: int = 32) -> None:
        """Normalised (N, C, H, W) images, de-normalised with ``mean``/``std`` (0..1 scale), as one grid image."""
        if self.tb is None or images is None or len(images) == 0:
            return
        from torchvision.utils import make_grid

        x = images[:max_images].detach().float().cpu()
        m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        x = (x * s + m).clamp_(0, 1)
        nrow = max(1, int(math.ceil(math.sqrt(len(x)))))
        self.tb.add_image(tag, make_grid(x, nrow=nrow, padding=2, pad_value=1.0), step)

    def confusion(self, step: int, cm: torch.Tensor, classes, prefix: str = "eval") -> None:
        """`<prefix>/confusion_matrix` image and `<prefix>_per_class/<class>` accuracy scalars."""
        if self.tb is None:
            return
        import numpy as np

        from distrain.report import per_class, render_confusion

        img = render_confusion(cm, classes, title=f"{prefix} at step {step}: " + _acc_text(cm))
        self.tb.add_image(f"{prefix}/confusion_matrix", np.asarray(img), step, dataformats="HWC")
        for rec in per_class(cm, classes):
            if rec["accuracy"] is not None:
                self.tb.add_scalar(f"{prefix}_per_class/{_tag(rec['class'])}", rec["accuracy"], step)

    def gpu_memory(self, step: int, device) -> None:
        """Peak and current GPU memory (MiB) of this process since the last call, on CUDA only."""
        if self.tb is None or torch.device(device).type != "cuda":
            return
        mib = 1024 * 1024
        self.tb.add_scalar("gpu/memory_allocated_mib", torch.cuda.memory_allocated(device) / mib, step)
        self.tb.add_scalar("gpu/max_memory_allocated_mib", torch.cuda.max_memory_allocated(device) / mib, step)
        self.tb.add_scalar("gpu/memory_reserved_mib", torch.cuda.memory_reserved(device) / mib, step)
        torch.cuda.reset_peak_memory_stats(device)

    def hparams(self, hparams: dict, metrics: dict, step: Optional[int] = None) -> None:
        """The HPARAMS tab: ``hparams`` (flat name -> bool/int/float/str) with final ``metrics``.

        Written into this run's own event file (SummaryWriter.add_hparams would make a new sub-run),
        with each metric also logged as a scalar, which is where the plugin reads its value.
        """
        if self.tb is None:
            return
        from torch.utils.tensorboard.summary import hparams as hp_summary

        clean = {}
        for k, v in hparams.items():
            v = _plain(v)
            clean[k] = v if isinstance(v, (bool, int, float, str)) else str(v)
        mets = {k: float(_plain(v)) for k, v in metrics.items() if _plain(v) is not None}
        exp, ssi, sei = hp_summary(clean, mets)
        fw = self.tb._get_file_writer()
        for s in (exp, ssi, sei):
            fw.add_summary(s, step)
        for k, v in mets.items():
            self.tb.add_scalar(k, v, step)

    def artifact(self, path: Path) -> None:
        """A file the run produced (the exported model), for trackers that store files."""

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
    return [int(cm[i, i]) / int(totals[i]) if totals[i] > 0 else None for i in range(cm.shape[0])]


def _tag(name: str) -> str:
    """A class name as a TensorBoard tag part."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)) or "_"


def _acc_text(cm: torch.Tensor) -> str:
    n = int(cm.sum())
    return f"accuracy {int(cm.diag().sum()) / n:.4f} on {n} images" if n else "no images"
