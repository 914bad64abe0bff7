"""Optimizers and learning-rate schedules, stepped once per optimizer step whatever the world size."""

from __future__ import annotations

import math

import torch
from torch import nn

from distrain.config import ModelConfig, TrainConfig
from distrain.models import backbone_and_head


def param_groups(model: nn.Module, train: TrainConfig, mcfg: ModelConfig) -> list[dict]:
    """Trainable parameters only (frozen ones get no optimizer state); the backbone may get its own lr.

    Biases and other 1-d parameters get no weight decay, as in the torchvision references. With
    ``model.unfreeze_after_epochs`` the frozen backbone is in its groups from the start: a parameter without
    a gradient gets no update and no state until it is unfrozen, and the optimizer's structure (and so a
    checkpoint's optimizer state) is the same before and after unfreezing.
    """
    backbone, head = backbone_and_head(model)
    bb_ids = {id(p) for p in backbone}
    groups: dict[tuple[bool, bool], list] = {}
    for p in model.parameters():
        if not p.requires_grad and mcfg.unfreeze_after_epochs is None:
            continue
        key = (id(p) in bb_ids, p.ndim <= 1)
        groups.setdefault(key, []).append(p)
    out = []
    for (is_bb, no_decay), params in sorted(groups.items()):
        name = ("backbone" if is_bb else "head") + ("_no_decay" if no_decay else "")
        out.append({"params": params, **group_hparams(name, train, mcfg), "name": name})
    return out


def group_hparams(name: str, train: TrainConfig, mcfg: ModelConfig) -> dict:
    """The lr and weight decay of the parameter group called ``name`` (see `param_groups`)."""
    return {"lr": train.lr * (mcfg.backbone_lr_mult if name.startswith("backbone") else 1.0),
            "weight_decay": 0.0 if name.endswith("_no_decay") else train.weight_decay}


def apply_optimizer_hparams(optimizer, scheduler, train: TrainConfig, mcfg: ModelConfig) -> None:
    """Set this config's lr, momentum, weight decay and nesterov into ``optimizer`` after a resume.

    Loading an optimizer's state restores the hyper-parameters of the run that saved it; a resumed
    run trains with its own (see resume_policy). The schedule keeps its position: each group's lr is
    its new base lr times the schedule's factor at the current step; the scheduler's base lrs
    follow.
    """
    for i, group in enumerate(optimizer.param_groups):
        hp = group_hparams(group.get("name", ""), train, mcfg)
        group["weight_decay"] = hp["weight_decay"]
        if train.optimizer == "sgd":
            group["momentum"] = train.momentum
            group["nesterov"] = train.nesterov and train.momentum > 0
        group["initial_lr"] = scheduler.base_lrs[i] = hp["lr"]
        group["lr"] = hp["lr"] * scheduler.lr_lambdas[i](scheduler.last_epoch)
    # get_last_lr() (logged as `lr`) reads this; the next scheduler.step() sets it the same way.
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def build_optimizer(model: nn.Module, train: TrainConfig, mcfg: ModelConfig, device_type: str = "cpu") -> torch.optim.Optimizer:
    groups = param_groups(model, train, mcfg)
    # Fused kernels (one pass over all parameters) exist for CUDA and CPU tensors; on a CPU they are ~3x faster
    # than the default per-tensor loop (cifar10_quick SGD step: 41 vs 146 us; VGG16: 0.4 vs 0.8-1.5 s).
    fused = True if device_type in ("cuda", "cpu") else None
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum,
                               nesterov=train.nesterov and train.momentum > 0, weight_decay=train.weight_decay,
                               fused=fused)
    return torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay, fused=fused)


def lr_factor(step: int, train: TrainConfig, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the base lr after `step` optimizer steps: linear warm-up, then the schedule."""
    if train.warmup_steps and step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    if train.scheduler == "none":
        return 1.0
    if train.scheduler == "step":
        return train.step_gamma ** (step // max(1, train.step_epochs * steps_per_epoch))
    # cosine from the end of warm-up to zero at the last step
    span = max(1, total_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, train: TrainConfig, steps_per_epoch: int, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, train, steps_per_epoch, total_steps)
    )
