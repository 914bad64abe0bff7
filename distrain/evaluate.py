"""Evaluation: the exact eval loop (every test image counted once, whatever the world size) and the
`distrain eval` command.

Invariants:
- Rank r evaluates images r::W of the split, unpadded; confusion matrix and loss are summed over
  ranks, so the counts are exact whether or not W divides the split.
- A data error met on one rank (an unreadable image) goes through `strategy.agree` before the
  reduction, so every rank fails with the same message instead of one hanging in the collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from distrain.errors import UserError
from distrain.metrics import confusion_matrix, per_class_accuracy


@dataclass
class EvalResult:
    confusion: torch.Tensor  # (C, C) on the CPU, rows = true class
    loss: float
    accuracy: float
    samples: int

    @classmethod
    def from_sums(cls, cm: torch.Tensor, loss_sum: torch.Tensor) -> "EvalResult":
        n = int(cm.sum().item())
        return cls(cm.cpu(), loss_sum.item() / max(n, 1), cm.diag().sum().item() / max(n, 1), n)


@torch.no_grad()
def eval_loop(model, data, strategy, num_classes: int, trace: Optional[list] = None,
              max_batches: Optional[int] = None) -> EvalResult:
    """Confusion matrix and mean loss over the split (or its first ``max_batches`` per rank)."""
    from distrain.distributed import autocast

    device = strategy.device
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    error: Optional[UserError] = None
    try:
        for i, (x, y, idx) in enumerate(strategy.lockstep(data)):  # in step under FSDP
            if max_batches is not None and i >= max_batches:
                break
            with autocast(device.type, strategy.precision):
                logits = model(x)
            if trace is not None:
                trace.extend(idx.tolist())
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            cm += confusion_matrix(logits.argmax(1), y, num_classes)
    except UserError as e:  # agreed below, before the collective
        error = e

    def report():
        if error is not None:
            raise error

    strategy.agree("read the test data", report)
    return EvalResult.from_sums(strategy.reduce_sum_(cm), strategy.reduce_sum_(loss_sum))


# ----------------------------------------------------------------------------------------------------
# `distrain eval`

def _eval_config(run_cfg: Optional[dict], info: dict, overrides: list[str]):
    """The config eval runs with: the training run's eval keys (config.is_eval_key), the model from
    its description, then the command line's overrides."""
    from distrain.config import Config, apply_overrides, config_from_dict, expand_paths, is_eval_key

    keep: dict = {}
    for section, part in (run_cfg or {}).items():
        if isinstance(part, dict):
            kept = {k: v for k, v in part.items() if is_eval_key(f"{section}.{k}")}
            if kept:
                keep[section] = kept
    cfg = config_from_dict(keep) if run_cfg else Config()
    cfg.model.name, cfg.model.num_classes = info["architecture"], info["num_classes"]
    cfg.model.input_size = info["input_size"][-1]
    cfg.model.pretrained, cfg.model.weights_path = False, None
    return expand_paths(apply_overrides(cfg, overrides))


def run_eval(path: str, overrides: list[str], confusion_dir: Optional[str] = None) -> Optional[dict]:
    """The test split through a trained model, on any world size; the result on the main process."""
    from distrain.build import pipeline_spec, split_of
    from distrain.data.pipeline import InputPipeline, prepare_data
    from distrain.distributed import Strategy, resolve_runtime
    from distrain.config import check_eval_overrides
    from distrain.export import load_model

    check_eval_overrides(overrides)  # eval takes data-ish keys only; the model comes from the checkpoint
    loaded = load_model(path)
    info = loaded.info
    cfg = _eval_config(loaded.config, info, overrides)
    strategy = Strategy(resolve_runtime(cfg.train.device, cfg.train.mixed_precision))
    if confusion_dir:  # an unwritable report directory fails on every rank before, not after
        from distrain.report import prepare_dir

        strategy.agree("create the --confusion directory",
                       lambda: prepare_dir(Path(confusion_dir)), main_only=True)
    strategy.agree("prepare the data", lambda: prepare_data(cfg.data), main_only=True)
    split = strategy.agree("load the test data", lambda: split_of(cfg, train=False))
    spec = pipeline_spec(cfg, max(cfg.train.batch_size, 256), mean_std=(info["mean"], info["std"]))
    data = InputPipeline(split, spec, strategy.device, strategy.rank, strategy.world, train=False)
    model = loaded.model.to(strategy.device).eval()
    res = eval_loop(model, data, strategy, cfg.model.num_classes)
    strategy.close()  # the last collective is behind every rank
    if not strategy.is_main:
        return None
    classes = info.get("classes") or [str(i) for i in range(cfg.model.num_classes)]
    result = {"accuracy": res.accuracy, "loss": res.loss, "samples": res.samples,
              "dataset": cfg.data.name, "checkpoint": str(loaded.source),
              "world_size": strategy.world,
              "per_class_accuracy": dict(zip(classes, per_class_accuracy(res.confusion))),
              "confusion": res.confusion}
    if confusion_dir:
        from distrain.report import write_confusion

        write_confusion(Path(confusion_dir), res.confusion, classes)
    return result
