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

The other trackers in `log.trackers` (distrain.trackers: csv, mlflow, wandb) get the same story:
the resolved config as parameters, the same scalar names at the same steps, the augmented batch and
confusion-matrix images, the final metrics, the exported model (`artifact`), and tags from the
`start` record (world size, device, precision, SLURM job). How a run ended comes from its records
(`outcome_of`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    import torch

# torch is imported where it is used: reading records (`distrain runs`) must not wait seconds for it.


def _is_tensor(v: Any) -> bool:
    torch = sys.modules.get("torch")  # without torch imported there is no tensor
    return torch is not None and isinstance(v, torch.Tensor)


def _plain(v: Any) -> Any:
    if _is_tensor(v):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


# Records that say how a run (since its last `start`) ended; the last one wins.
_OUTCOME = {"end": "finished", "stopped": "stopped", "diverged": "diverged"}


def outcome_of(rec: dict) -> Optional[str]:
    """finished / stopped / diverged if this metrics.jsonl record ends a run, else None.

    Runs written before the `stopped` record existed end with a checkpoint whose reason is "stop".
    """
    event = rec.get("event")
    if event == "checkpoint" and rec.get("reason") == "stop":
        return "stopped"
    return _OUTCOME.get(event)


class MetricsLogger:
    """metrics.jsonl, TensorBoard and the other trackers of ``log_cfg.trackers``, main process only.

    Without ``log_cfg`` only metrics.jsonl and TensorBoard (``tensorboard``) are written. Every rank
    checks that the configured trackers are installed (the same UserError everywhere). The tracker
    runs start at the first thing sent to them (the start banner's config), not here: a resume that
    is refused after the logger exists must not open or mark a tracker run.
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True, log_cfg=None,
                 warn: Optional[Callable[[str], None]] = None):
        from distrain import trackers

        names = list(log_cfg.trackers) if log_cfg is not None else ["tensorboard"]
        trackers.check_installed(names)
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        self.trackers: list = []
        self._outcome = "failed"  # until a record says otherwise
        if enabled and tensorboard and "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
        others = [n for n in names if n != "tensorboard"]
        self._to_open = (others, log_cfg, Path(run_dir), warn) if enabled and others else None

    @property
    def active(self) -> bool:
        """Anything beside metrics.jsonl to write to."""
        return self.tb is not None or bool(self.trackers) or self._to_open is not None

    def _each(self, method: str, *args: Any) -> None:
        if self._to_open is not None:
            from distrain.trackers import open_trackers

            pending, self._to_open = self._to_open, None
            self.trackers = open_trackers(*pending)
        for t in self.trackers:
            t.call(method, *args)

    def log(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        rec = {"event": event, **{k: _plain(v) for k, v in fields.items()}, "time": round(time.time(), 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
        self._outcome = outcome_of(rec) or self._outcome
        if event == "start" and self.active:
            from distrain.trackers import slurm_tags

            keys = ("world_size", "device", "precision", "global_batch")
            tags = {k: rec[k] for k in keys if k in rec}
            self._each("tags", {**tags, **slurm_tags()})

    def scalars(self, step: int, **values: float) -> None:
        if not self.active:
            return
        clean = {}
        for k, v in values.items():
            if _is_tensor(v):
                v = v.item()
            if v is not None:
                clean[k] = float(v)
                if self.tb is not None:  # NaN/inf kept: TensorBoard shows a diverged run as such
                    self.tb.add_scalar(k, float(v), step)
        if clean:
            self._each("metrics", clean, step)

    # -- TensorBoard views (issue 7); all no-ops off the main process or with log.tensorboard=false --------
    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def config(self, cfg, step: int = 0, note: str = "") -> None:
        """The resolved config: TensorBoard text (YAML in a code block), the trackers' params."""
        self._each("params", cfg.to_dict())
        if self.tb is None:
            return
        body = "\n".join("    " + line for line in cfg.to_yaml().splitlines())
        self.tb.add_text("config", (note + "\n\n" if note else "") + body, step)

    def image_grid(self, tag: str, images: torch.Tensor, mean, std, step: int = 0, max_images: int = 32) -> None:
        """Normalised (N, C, H, W) images, de-normalised with ``mean``/``std`` (0..1 scale), as one grid image."""
        if not self.active or images is None or len(images) == 0:
            return
        import torch
        from torchvision.utils import make_grid

        x = images[:max_images].detach().float().cpu()
        m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        x = (x * s + m).clamp_(0, 1)
        nrow = max(1, int(math.ceil(math.sqrt(len(x)))))
        grid = make_grid(x, nrow=nrow, padding=2, pad_value=1.0)
        if self.tb is not None:
            self.tb.add_image(tag, grid, step)
        hwc = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        self._each("image", tag, hwc, step)

    def confusion(self, step: int, cm: torch.Tensor, classes, prefix: str = "eval") -> None:
        """`<prefix>/confusion_matrix` image and `<prefix>_per_class/<class>` accuracy scalars."""
        if not self.active:
            return
        import numpy as np

        from distrain.report import per_class, render_confusion

        title = f"{prefix} at step {step}: " + _acc_text(cm)
        img = np.asarray(render_confusion(cm, classes, title=title))
        if self.tb is not None:
            self.tb.add_image(f"{prefix}/confusion_matrix", img, step, dataformats="HWC")
        self._each("image", f"{prefix}/confusion_matrix", img, step)
        self.scalars(step, **{f"{prefix}_per_class/{_tag(rec['class'])}": rec["accuracy"]
                              for rec in per_class(cm, classes) if rec["accuracy"] is not None})

    def gpu_memory(self, step: int, device) -> None:
        """Peak and current GPU memory (MiB) of this process since the last call, on CUDA only."""
        import torch

        if not self.active or torch.device(device).type != "cuda":
            return
        mib = 1024 * 1024
        cuda = torch.cuda
        self.scalars(step, **{
            "gpu/memory_allocated_mib": cuda.memory_allocated(device) / mib,
            "gpu/max_memory_allocated_mib": cuda.max_memory_allocated(device) / mib,
            "gpu/memory_reserved_mib": cuda.memory_reserved(device) / mib})
        torch.cuda.reset_peak_memory_stats(device)

    def hparams(self, hparams: dict, metrics: dict, step: Optional[int] = None) -> None:
        """The HPARAMS tab: ``hparams`` (flat name -> bool/int/float/str) with final ``metrics``.

        Written into this run's own event file (SummaryWriter.add_hparams would make a new sub-run),
        with each metric also logged as a scalar, which is where the plugin reads its value.
        Trackers get the metrics (their parameters are the config).
        """
        mets = {k: float(_plain(v)) for k, v in metrics.items() if _plain(v) is not None}
        if self.tb is not None:
            from torch.utils.tensorboard.summary import hparams as hp_summary

            clean = {}
            for k, v in hparams.items():
                v = _plain(v)
                clean[k] = v if isinstance(v, (bool, int, float, str)) else str(v)
            exp, ssi, sei = hp_summary(clean, mets)
            fw = self.tb._get_file_writer()
            for s in (exp, ssi, sei):
                fw.add_summary(s, step)
            for k, v in mets.items():
                self.tb.add_scalar(k, v, step)
        if mets:
            self._each("metrics", mets, step or 0)

    def artifact(self, *paths: Path) -> None:
        """Files the run produced (the exported model) to MLflow (artifacts) and W&B (files)."""
        for p in paths:
            if Path(p).is_file():
                self._each("artifact", Path(p))

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        """End TensorBoard and each tracker run (saying how the run ended); idempotent."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        trackers, self.trackers, self._to_open = self.trackers, [], None
        for t in trackers:
            t.call("finish", self._outcome)


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
    import torch

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
