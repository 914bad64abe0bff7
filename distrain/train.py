"""`distrain train`: claim the run directory, build, resume, fit, export.

The order matters: the run lock comes before anything touches the directory; the resume decision
before config.yaml is written (a refused resume leaves the run's config as it was); every step that
can fail on bad input runs through `strategy.agree`, so all ranks fail alike.
"""

from __future__ import annotations

from pathlib import Path

from distrain import resume, rundir, trace
from distrain.build import build, check_toolchain
from distrain.checkpoint import CheckpointStore
from distrain.config import Config, dump_config
from distrain.distributed import DistOptions, Strategy, resolve_runtime, unwrap
from distrain.export import model_info
from distrain.metrics import MetricsLogger
from distrain.progress import Progress
from distrain.trainer import Trainer


def dist_options(cfg: Config) -> DistOptions:
    t = cfg.train
    # static_graph: the trained parameters never change, unless the backbone is unfrozen later; DDP's
    # static graph also fails inside no_sync (an internal assert), so not with accumulation.
    unfreezes = cfg.model.unfreeze_after_epochs is not None
    return DistOptions(comm_hook=t.ddp_comm_hook, static_graph=not unfreezes and t.grad_accum_steps == 1,
                       batch_size=t.batch_size, grad_accum_steps=t.grad_accum_steps,
                       grad_clip=t.grad_clip, unfreezes=unfreezes,
                       collective_timeout_s=t.collective_timeout_s)


def run_training(cfg: Config, signals=None) -> int:
    strategy = Strategy(resolve_runtime(cfg.train.device, cfg.train.mixed_precision), dist_options(cfg))
    progress = Progress(enabled=strategy.is_main, mode=cfg.log.progress, every_steps=cfg.log.every_steps)
    run = None
    watchdog = strategy.watch_peers(cfg.train.peer_timeout_s, signals, progress.write)
    try:
        check_toolchain(cfg, strategy)
        lock = strategy.agree("claim the run directory", lambda: rundir.claim(cfg, progress.write),
                              main_only=True)
        for note in strategy.notes():
            progress.write(note)
        parts = build(cfg, strategy)
        path = Path(cfg.output_dir)
        # A tracker that is not installed fails every rank before training, not the main one alone.
        metrics = strategy.agree("start the trackers", lambda: MetricsLogger(
            path, enabled=strategy.is_main, tensorboard=cfg.log.tensorboard, log_cfg=cfg.log,
            warn=progress.write))
        store = CheckpointStore(path / "checkpoints", cfg.checkpoint.keep_last, cfg.checkpoint.keep_best,
                                log=progress.write)
        info = model_info(cfg, parts.train_split.classes, *parts.mean_std)
        run = rundir.RunDir(path, store, metrics, info, lock)
        trainer = Trainer(cfg, strategy, parts, run, progress, signals)
        resume_from_checkpoint(trainer)
        strategy.agree("write config.yaml", lambda: dump_config(cfg, path / "config.yaml"),
                       main_only=True)
        trainer.report.start(trainer)
        code = trainer.fit()
        strategy.close()  # every rank is here: after the export, or the stop and its barrier
        return code
    finally:
        if watchdog is not None:
            watchdog.stop()
        progress.close()
        if run is not None:
            run.close()


def resume_from_checkpoint(t: Trainer) -> None:
    """Continue from the checkpoint the `resume` key names, if any (every rank)."""
    cfg, s, p = t.cfg, t.strategy, t.parts
    shape = resume.RunShape(cfg, s.world, s.global_batch)
    check = resume.ResumeCheck(shape, t.log)
    store = t.run.store
    found = s.agree("find a checkpoint to resume",
                    lambda: resume.find_resume(cfg.resume, store.dir, store.newest_good, check))
    if found is None:
        return
    targets = resume.Targets(unwrap(t.model), p.optimizer, p.scheduler, s, cfg, t.plan, len(p.train_split))
    t.state, meta = s.agree("load the checkpoint", lambda: resume.restore(found, targets, t.log))
    if s.is_main and cfg.log.trace_samples:
        old_accum = meta["config"].get("train", {}).get("grad_accum_steps", 1)
        trace.trim(t.run.path, t.state.epoch, t.state.step_in_epoch, old_accum)
    t.log(f"resumed from {found} at epoch {t.state.epoch} step {t.state.global_step}")
