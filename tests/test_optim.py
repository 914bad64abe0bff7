"""Optimizers and schedules: warm-up then cosine/step, stepped per optimizer step; parameter groups."""

import math

import pytest
import torch

from distrain.config import load_config
from distrain.models import build_model
from distrain.optim import build_optimizer, build_scheduler, lr_factor, param_groups


def _train(*over):
    return load_config(None, list(over)).train


def test_warmup_then_cosine_to_zero():
    t = _train("train.warmup_steps=10", "train.scheduler=cosine")
    f = [lr_factor(s, t, steps_per_epoch=20, total_steps=110) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[60] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone after warm-up
    assert lr_factor(110, t, 20, 110) == pytest.approx(0.0, abs=1e-12)


def test_step_schedule_counts_epochs_in_optimizer_steps():
    t = _train("train.scheduler=step", "train.step_epochs=2", "train.step_gamma=0.5")
    assert lr_factor(39, t, steps_per_epoch=20, total_steps=100) == 1.0
    assert lr_factor(40, t, 20, 100) == 0.5 and lr_factor(80, t, 20, 100) == 0.25


def test_none_schedule_is_constant():
    t = _train("train.scheduler=none")
    assert {lr_factor(s, t, 10, 100) for s in range(100)} == {1.0}


def test_scheduler_steps_once_per_call():
    t = _train("train.lr=0.1", "train.scheduler=cosine")
    m = build_model("cifar10_quick")
    opt = build_optimizer(m, t, load_config().model)
    sched = build_scheduler(opt, t, steps_per_epoch=10, total_steps=10)
    lrs = []
    for _ in range(10):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert lrs[4] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))


def test_param_groups_no_decay_on_biases_and_frozen_excluded():
    cfg = load_config(None, ["model.name=vgg16", "model.backbone_lr_mult=0.1", "train.lr=0.01"])
    m = build_model("vgg16")
    groups = {g["name"]: g for g in param_groups(m, cfg.train, cfg.model)}
    assert groups["backbone"]["lr"] == pytest.approx(0.001) and groups["head"]["lr"] == pytest.approx(0.01)
    assert groups["head_no_decay"]["weight_decay"] == 0.0 and groups["head"]["weight_decay"] == cfg.train.weight_decay
    for p in m.features.parameters():
        p.requires_grad_(False)
    names = {g["name"] for g in param_groups(m, cfg.train, cfg.model)}
    assert names == {"head", "head_no_decay"}


def test_sgd_and_adamw():
    cfg = load_config(None, ["train.optimizer=adamw", "train.lr=0.001"])
    assert isinstance(build_optimizer(build_model("cifar10_quick"), cfg.train, cfg.model), torch.optim.AdamW)
    cfg = load_config(None, ["train.optimizer=sgd", "train.nesterov=true", "train.momentum=0.9"])
    opt = build_optimizer(build_model("cifar10_quick"), cfg.train, cfg.model)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
