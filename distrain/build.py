"""Components of a run from its config: data splits, model, optimizer, schedule, input pipelines.

Used alike by `distrain train`, `distrain bench` and benchmarks/, so a benchmark times what training
runs. Writes nothing (no run directory, no checkpoint, no metrics).

Invariants:
- Every rank builds the same initial weights (seeded from `train.seed` before the model is built),
  then switches to its own random stream (`derived_seed(seed, rank, 1)`).
- Every step that may fail on bad input runs through `strategy.agree`, so all ranks fail alike; the
  main process fetches data and weights first while the others wait.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from distrain.config import Config
from distrain.data.pipeline import (InputPipeline, PipelineSpec, Split, load_split, normalization,
                                    prepare_data)
from distrain.data.sampling import EpochPlan, derived_seed
from distrain.model_specs import preprocessing
from distrain.models import backbone_and_head, build_from_config, convert_sync_batchnorm
from distrain.optim import build_optimizer, build_scheduler
from distrain.seeding import seed_everything
from distrain.toolchain import check_compile_toolchain

EVAL_BATCH_MIN = 256  # evaluation needs no gradients: larger batches, fewer steps


@dataclass
class Components:
    cfg: Config
    train_split: Split
    test_split: Split
    model: torch.nn.Module  # as prepared by the strategy (DDP / DeepSpeed / plain)
    optimizer: object
    scheduler: object
    train_data: InputPipeline
    test_data: InputPipeline
    steps_per_epoch: int
    total_steps: int
    mean_std: tuple

    def plan(self, epoch: int, rank: int, world: int) -> EpochPlan:
        t = self.cfg.train
        return EpochPlan(len(self.train_split), t.batch_size, world, rank, t.grad_accum_steps,
                         t.seed, epoch, shuffle=True)


def build(cfg: Config, strategy) -> Components:
    """Everything a training step needs, on every rank (`check_toolchain` first)."""
    if strategy.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: cuDNN picks its kernels once
    train_split, test_split = load_data(cfg, strategy)
    seed_everything(cfg.train.seed)  # the same initial weights on every rank, as one process has
    model = strategy.agree("build the model", lambda: model_from_config(cfg))
    if cfg.model.sync_bn:  # needs the process group: after it exists, before DDP wraps the model
        model = convert_sync_batchnorm(model, strategy.world, strategy.rt.device, strategy.reduce_sum_)
    seed_everything(derived_seed(cfg.train.seed, strategy.rank, 1))
    optimizer = build_optimizer(model, cfg.train, cfg.model, strategy.device.type)
    t = cfg.train
    steps = EpochPlan(len(train_split), t.batch_size, strategy.world, strategy.rank,
                      t.grad_accum_steps, t.seed, 0, shuffle=True).num_steps
    total = t.epochs * steps if t.max_steps is None else min(t.epochs * steps, t.max_steps)
    scheduler = build_scheduler(optimizer, t, steps, total)
    if cfg.model.compile:
        model = torch.compile(model)
    model, optimizer = strategy.prepare(model, optimizer)
    train_data, test_data = pipelines(cfg, strategy, train_split, test_split)
    return Components(cfg, train_split, test_split, model, optimizer, scheduler, train_data,
                      test_data, steps, total, normalization(cfg))


def check_toolchain(cfg: Config, strategy) -> None:
    """What must be installed, before any data or output work: torch.compile would otherwise fail
    only at the first step."""
    if cfg.model.compile:
        strategy.agree("find a compiler for torch.compile",
                       lambda: check_compile_toolchain(strategy.device.type))


def load_data(cfg: Config, strategy) -> tuple[Split, Split]:
    """Both splits; the main process downloads data (and pretrained weights) first."""
    strategy.agree("prepare the data", lambda: prepare_data(cfg.data), main_only=True)
    if cfg.model.pretrained:
        from distrain.weights import prepare_weights

        strategy.agree("fetch the pretrained weights", lambda: prepare_weights(cfg), main_only=True)
    train_split = strategy.agree("load the training data", lambda: split_of(cfg, train=True))
    test_split = strategy.agree("load the test data", lambda: split_of(cfg, train=False))
    if cfg.data.name == "imagefolder":
        from distrain.data.imagefolder import check_same_classes

        strategy.agree("compare class folders",
                       lambda: check_same_classes(train_split.classes, test_split.classes))
    return train_split, test_split


def model_from_config(cfg: Config) -> torch.nn.Module:
    """The bare model: architecture, initial weights, frozen backbone, memory format."""
    model = build_from_config(cfg.model)
    if cfg.model.pretrained or cfg.model.weights_path:
        from distrain.weights import load_pretrained

        load_pretrained(model, cfg.model)
    if cfg.model.freeze_features:
        for p in backbone_and_head(model)[0]:
            p.requires_grad_(False)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def pipelines(cfg: Config, strategy, train_split: Split, test_split: Split):
    from distrain.signals import shield_data_worker

    dev, rank, world = strategy.device, strategy.rank, strategy.world
    local = strategy.local_world_size
    eval_batch = max(cfg.train.batch_size, EVAL_BATCH_MIN)
    train_data = InputPipeline(train_split, pipeline_spec(cfg, cfg.train.batch_size), dev, rank, world,
                               train=True, local_world_size=local)
    test_data = InputPipeline(test_split, pipeline_spec(cfg, eval_batch), dev, rank, world,
                              train=False, local_world_size=local)
    # SLURM, `kill -- -PGID` and Ctrl-C signal the DataLoader workers too: they must survive until
    # the stop checkpoint is written (see signals.shield_data_worker).
    for pipe in (train_data, test_data):
        loader = getattr(pipe, "loader", None)
        if loader is not None and loader.num_workers > 0:
            loader.worker_init_fn = shield_data_worker
    return train_data, test_data


def pipeline_spec(cfg: Config, batch_size: int, mean_std: Optional[tuple] = None) -> PipelineSpec:
    """The input-pipeline settings of a run, decided once (the data layer never sees the config)."""
    mean, std = mean_std or normalization(cfg)
    return PipelineSpec(batch_size=batch_size, seed=cfg.train.seed, augment=cfg.data.augment,
                        input_size=cfg.model.input_size, mean=tuple(mean), std=tuple(std),
                        channels_last=cfg.model.channels_last, loader=cfg.data.loader,
                        num_workers=cfg.data.num_workers)


def split_of(cfg: Config, train: bool) -> Split:
    resize = preprocessing(cfg.model, cfg.data.name)[2]  # the eval resize of the model's weights
    return load_split(cfg.data, train, cfg.train.seed, cfg.model.num_classes, cfg.model.input_size,
                      resize)
