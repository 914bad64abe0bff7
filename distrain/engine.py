"""The training engine: one readable loop over epochs and optimizer steps, on any world size.

Accelerate places the model, wraps it in DDP and runs mixed precision; the engine owns everything that
decides *what* is computed, so results do not depend on how many processes run:

- Data order and sharding come from `data.sampling.EpochPlan`; loaders are never given to
  `accelerator.prepare()` (it would shard them a second time).
- Each micro-batch's loss is a *sum* scaled by ``world_size / images_in_this_optimizer_step``: after
  DDP averages over ranks, the gradient is the mean over exactly the images of the step, however they
  were split between ranks and micro-batches.
- Gradient accumulation uses ``no_sync`` on all but the last micro-batch (no all-reduce in between).
- The LR scheduler is stepped here, once per optimizer step (Accelerate's wrapper would step it once per
  process).

Every phase that can fail on bad input runs through `_agree`, so all ranks raise the same UserError
instead of one failing while the others wait forever in a collective.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from distrain import checkpoint as ckpt
from distrain.config import Config, dump_config
from distrain.data.pipeline import InputPipeline, Split, load_split, normalization, prepare_data
from distrain.data.sampling import EpochPlan, derived_seed
from distrain.errors import UserError
from distrain.export import export_model, model_info
from distrain.metrics import MetricsLogger, confusion_matrix
from distrain.models import (backbone_and_head, build_from_config, convert_sync_batchnorm,
                             count_parameters)
from distrain.optim import build_optimizer, build_scheduler
from distrain.progress import Progress


# ----------------------------------------------------------------------------------------------------
# Device and precision


@dataclass
class Runtime:
    device: str  # "cpu" or "cuda"
    precision: str  # what actually runs: "no", "fp16", "bf16"
    note: str  # one line for the log: what was asked, what runs, why


def resolve_runtime(device: str, precision: str) -> Runtime:
    """Decide device and precision before any process group exists; the same answer on every rank."""
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise UserError("config key 'train.device=cuda' but no CUDA GPU is visible; use train.device=auto or cpu")
    dev = "cuda" if (device == "cuda" or (device == "auto" and has_cuda)) else "cpu"
    bf16_ok = dev == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        if dev == "cpu":
            return Runtime(dev, "no", "mixed precision auto -> fp32 (no CUDA GPU; CPU autocast would be slower)")
        p = "bf16" if bf16_ok else "fp16"
        return Runtime(dev, p, f"mixed precision auto -> {p} on {torch.cuda.get_device_name()}")
    if precision == "fp16" and dev == "cpu":
        raise UserError("config key 'train.mixed_precision=fp16' needs a CUDA GPU and none is in use; "
                        "use train.mixed_precision=bf16 (CPU autocast), no or auto")
    if precision == "bf16" and dev == "cuda" and not bf16_ok:
        raise UserError(f"config key 'train.mixed_precision=bf16': {torch.cuda.get_device_name()} has no bf16 support; "
                        "use fp16 or auto")
    if precision == "bf16" and dev == "cpu":
        return Runtime(dev, "bf16", "mixed precision bf16 -> bf16 autocast on the CPU (as asked)")
    return Runtime(dev, precision, f"mixed precision {precision} on {dev}")


def deepspeed_requested() -> bool:
    """True under `accelerate launch --config_file launch/deepspeed_zero2.yaml` (Accelerate's DeepSpeed mode)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(rt: Runtime, find_unused: bool = False, comm_hook: str = "none", static_graph: bool = False):
    from accelerate import Accelerator
    from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs

    # gradient_as_bucket_view saves a gradient-sized copy (VGG16: 0.5 GB in fp32). The comm hook all-reduces
    # gradients in 16 bits (train.ddp_comm_hook); static_graph lets DDP skip per-step graph bookkeeping when
    # the set of trained parameters never changes (not with model.unfreeze_after_epochs).
    hook = {"none": DDPCommunicationHookType.NO, "bf16": DDPCommunicationHookType.BF16,
            "fp16": DDPCommunicationHookType.FP16}[comm_hook]
    ddp = DistributedDataParallelKwargs(gradient_as_bucket_view=True, find_unused_parameters=find_unused,
                                        comm_hook=hook, static_graph=static_graph)
    handlers: list = [ddp]
    cpu = rt.device == "cpu"
    if deepspeed_requested():
        import importlib.util

        missing = [m for m in ("deepspeed", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            raise UserError(f"the accelerate config asks for DeepSpeed but {' and '.join(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} not installed; pip install 'distrain[deepspeed]'")
        # Accelerate turns DeepSpeed on only with cpu=False; on a CPU-only host its process group then needs
        # an explicit backend, or every process believes it is rank 0 of 1.
        cpu = False
        if rt.device == "cpu":
            if torch.cuda.is_available():
                raise UserError("DeepSpeed with train.device=cpu on a host with GPUs is not supported; "
                                "use train.device=auto")
            from accelerate.utils import InitProcessGroupKwargs

            handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(cpu=cpu, mixed_precision=rt.precision, kwargs_handlers=handlers,
                       step_scheduler_with_optimizer=False)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine":
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def autocast(device_type: str, precision: str):
    """torch.autocast for the precision that runs (a no-op for fp32)."""
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# Progress


@dataclass
class TrainState:
    """Where training is; saved in every checkpoint. Steps are optimizer steps."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in `epoch`
    global_step: int = 0
    best_accuracy: Optional[float] = None
    best_step: Optional[int] = None
    # Running totals of the current epoch on this rank (so a resumed epoch reports whole-epoch numbers).
    epoch_loss_sum: float = 0.0
    epoch_correct: int = 0
    epoch_samples: int = 0
    finished: bool = False


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rt = resolve_runtime(cfg.train.device, cfg.train.mixed_precision)
        # static_graph: the trained parameters never change, unless the backbone is unfrozen later; DDP's
        # static graph also fails inside no_sync (an internal assert), so not with gradient accumulation.
        static = cfg.model.unfreeze_after_epochs is None and cfg.train.grad_accum_steps == 1
        self.accelerator = make_accelerator(self.rt, comm_hook=cfg.train.ddp_comm_hook, static_graph=static)
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        self.is_main = acc.is_main_process
        self.device = acc.device
        from accelerate.utils import DistributedType

        self.is_deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        self.run_dir = Path(cfg.output_dir)
        self.state = TrainState()
        self.signals = None
        self.progress = Progress(enabled=self.is_main, mode=cfg.log.progress)
        # Agreeing on a stop is a collective; on GPUs do it every few steps to avoid a host sync per step.
        self.stop_check_every = 1 if self.rt.device == "cpu" else 8

    # -- agreement between ranks ------------------------------------------------------------------
    def _agree(self, what: str, fn: Callable, main_only: bool = False):
        """Run ``fn`` (on every rank, or the main one while the others wait); fail everywhere if it fails anywhere."""
        err: Optional[str] = None
        out = None
        if self.is_main or not main_only:
            try:
                out = fn()
            except UserError as e:
                err = "user:" + str(e)
            except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                err = f"bug:{what} failed on rank {self.rank}: {type(e).__name__}: {e}"
                if self.world == 1:
                    raise
        if self.world > 1:
            from accelerate.utils import gather_object

            errs = [e for e in gather_object([err]) if e]
            err = errs[0] if errs else None
        if err:
            kind, msg = err.split(":", 1)
            if kind == "user":
                raise UserError(msg)
            raise RuntimeError(msg)
        return out

    def any_rank(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    def log(self, msg: str) -> None:
        self.progress.write(msg)

    # -- setup ------------------------------------------------------------------------------------
    def _make_run_dir(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UserError(f"config key 'output_dir': cannot write to '{self.run_dir}': {e.strerror or e}") from None

    def setup(self) -> None:
        cfg = self.cfg
        self._agree("create the run directory", self._make_run_dir, main_only=True)
        self.ckpts = ckpt.CheckpointManager(self.run_dir / "checkpoints", self)
        self._agree("clean up interrupted checkpoint writes", self.ckpts.clean_temporaries, main_only=True)
        self.build()
        self.metrics = MetricsLogger(self.run_dir, enabled=self.is_main, tensorboard=cfg.log.tensorboard)

        resumed = self._agree("find a checkpoint to resume", self.ckpts.find_resume)
        if resumed is not None:
            self.state = self._agree("load the checkpoint", lambda: self.ckpts.load(resumed))
            self.log(f"resumed from {resumed} at epoch {self.state.epoch} step {self.state.global_step}")
        # Only now: a refused resume (another architecture, batch, ...) must leave the run's config.yaml as it was.
        self._agree("write config.yaml", lambda: dump_config(cfg, self.run_dir / "config.yaml"), main_only=True)

    def build(self) -> None:
        """Data, model, optimizer, schedule and input pipelines; writes nothing (`distrain bench` uses it alone)."""
        cfg, acc = self.cfg, self.accelerator
        if self.rt.device == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels once
        # Rank 0 downloads first; the others only read once it is there.
        self._agree("prepare the data", lambda: prepare_data(cfg), main_only=True)
        if cfg.model.pretrained:  # ImageNet weights: downloaded into the hub cache once; every rank loads from there
            from distrain.weights import prepare_weights

            self._agree("fetch the pretrained weights", lambda: prepare_weights(cfg), main_only=True)
        self.train_split: Split = self._agree("load the training data", lambda: load_split(cfg, train=True))
        self.test_split: Split = self._agree("load the test data", lambda: load_split(cfg, train=False))
        if cfg.data.name == "imagefolder":
            from distrain.data.imagefolder import check_same_classes

            self._agree("compare class folders", lambda: check_same_classes(self.train_split.classes, self.test_split.classes))

        # The same initial weights on every rank (as one process would have), then per-rank streams.
        seed_everything(cfg.train.seed)
        model = self._agree("build the model", self._build_model, main_only=False)
        seed_everything(derived_seed(cfg.train.seed, self.rank, 1))
        self.num_params = count_parameters(model)
        optimizer = build_optimizer(model, cfg.train, cfg.model, self.rt.device)
        self.steps_per_epoch = self.plan(0).num_steps
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.scheduler = build_scheduler(optimizer, cfg.train, self.steps_per_epoch, self.total_steps)
        if cfg.model.compile:
            model = torch.compile(model)
        if self.is_deepspeed:
            self._agree("configure DeepSpeed", self._configure_deepspeed)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.unfrozen = False

        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.train_data = InputPipeline(self.train_split, cfg, self.device, self.rank, self.world, train=True,
                                        local_world_size=local_world)
        self.test_data = InputPipeline(self.test_split, cfg, self.device, self.rank, self.world, train=False,
                                       local_world_size=local_world, eval_batch_size=max(cfg.train.batch_size, 256))
        # SLURM, `kill -- -PGID` and Ctrl-C signal the DataLoader workers too: they must survive until the stop
        # checkpoint is written (see signals.shield_data_worker).
        from distrain.signals import shield_data_worker

        for pipe in (self.train_data, self.test_data):
            loader = getattr(pipe, "loader", None)
            if loader is not None and loader.num_workers > 0:
                loader.worker_init_fn = shield_data_worker

    def _build_model(self):
        cfg = self.cfg
        model = build_from_config(cfg.model)
        if cfg.model.pretrained or cfg.model.weights_path:
            from distrain.weights import load_pretrained

            load_pretrained(model, cfg.model)
        if cfg.model.freeze_features:
            for p in backbone_and_head(model)[0]:
                p.requires_grad_(False)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        # SyncBatchNorm needs the process group: after it exists, before DDP wraps the model.
        if cfg.model.sync_bn:
            model = convert_sync_batchnorm(model, self.world, self.rt.device,
                                           lambda t: self.accelerator.reduce(t, reduction="sum"))
        return model

    def unwrapped(self) -> torch.nn.Module:
        """The bare model under DDP / torch.compile wrappers.

        Not accelerator.unwrap_model: it imports DeepSpeed whenever DeepSpeed is installed, which costs seconds
        of CPU detection and prints to stdout.
        """
        return unwrap(self.model)

    def model_state_dict(self) -> dict:
        """Full state_dict of the bare model, as the export and checkpoints store it."""
        if self.accelerator.distributed_type.value == "DEEPSPEED":
            return self.accelerator.get_state_dict(self.model, unwrap=True)
        return unwrap(self.model).state_dict()

    def _configure_deepspeed(self) -> None:
        """DeepSpeed's batch keys come from the run config (its train_batch_size assertion must hold).

        DeepSpeed steps the optimizer inside ``accelerator.backward`` on the step's last micro-batch (see
        `train_one_epoch`) and clips there, so gradient_clipping is train.grad_clip (0 = off; Accelerate's
        default would be 1.0). The optimizer stays the torch one from `build_optimizer`.
        """
        cfg, t = self.cfg, self.cfg.train
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin.zero_stage == 3:
            raise UserError("DeepSpeed ZeRO stage 3 is not supported (VGG16's parameters fit every device; uneven "
                            "evaluation shards would hang its parameter gathers); use launch/deepspeed_zero2.yaml")
        if cfg.model.unfreeze_after_epochs is not None:
            raise UserError("config key 'model.unfreeze_after_epochs' is not supported under DeepSpeed (its optimizer "
                            "is built once over the trainable parameters); launch without the DeepSpeed config")
        if t.ddp_comm_hook != "none":
            self.log(f"warning: train.ddp_comm_hook={t.ddp_comm_hook} applies to DDP and is ignored under DeepSpeed")
        ds = plugin.deepspeed_config
        for section in ("optimizer", "scheduler"):
            if section in ds:
                raise UserError(f"the DeepSpeed config has a '{section}' section; remove it: distrain builds the "
                                f"{section} from train.optimizer / train.scheduler")
        ds["train_micro_batch_size_per_gpu"] = t.batch_size
        ds["gradient_accumulation_steps"] = t.grad_accum_steps
        ds["train_batch_size"] = self.global_batch
        ds["gradient_clipping"] = t.grad_clip or 0.0
        self.accelerator.gradient_accumulation_steps = t.grad_accum_steps  # keeps Accelerate from warning

    def maybe_unfreeze(self, epoch: int) -> None:
        """model.unfreeze_after_epochs: from that epoch on, train the backbone too (also right after a resume).

        The optimizer already holds the backbone (see optim.param_groups); DDP registered only the parameters
        that required gradients when it was built, so it is built again around the same module.
        """
        n = self.cfg.model.unfreeze_after_epochs
        if n is None or self.unfrozen or epoch < n:
            return
        for p in backbone_and_head(self.unwrapped())[0]:
            p.requires_grad_(True)
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            module = self.model.module  # as it was wrapped (compiled or not)
            acc = self.accelerator
            kwargs = acc.ddp_handler.to_kwargs() if acc.ddp_handler is not None else {}
            ids = [self.device.index] if self.device.type == "cuda" else None
            ddp = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, output_device=ids and ids[0], **kwargs)
            if acc.ddp_handler is not None:
                acc.ddp_handler.register_comm_hook(ddp)
            # Accelerate keeps the models it prepared (for unwrap/save); swap ours so the old wrapper can go.
            acc._models[:] = [ddp if m is self.model else m for m in acc._models]
            self.model = ddp
        self.unfrozen = True
        self.num_params = count_parameters(self.unwrapped())
        self.log(f"epoch {epoch + 1}: backbone unfrozen (model.unfreeze_after_epochs={n}); "
                 f"{self.num_params[1]:,} trainable parameters")

    def _frozen_bn_eval(self) -> None:
        """BatchNorm layers of a frozen backbone (vgg16_bn) keep their statistics: eval mode while frozen."""
        if not self.cfg.model.freeze_features or self.unfrozen:
            return
        for m in self.unwrapped().modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                m.eval()

    def plan(self, epoch: int) -> EpochPlan:
        t = self.cfg.train
        return EpochPlan(len(self.train_split), t.batch_size, self.world, self.rank, t.grad_accum_steps,
                         t.seed, epoch, shuffle=True)

    @property
    def global_batch(self) -> int:
        return self.cfg.train.batch_size * self.world * self.cfg.train.grad_accum_steps

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self) -> int:
        """Train to the end or to a requested stop; returns the process exit code."""
        cfg, st = self.cfg, self.state
        self.banner()
        t_start = time.time()
        if st.epoch >= cfg.train.epochs or self.reached_max_steps():
            st.finished = True  # e.g. resumed with a shorter schedule than the checkpoint's
        while not st.finished:
            if self.train_one_epoch(st.epoch):
                self.ckpts.save(reason="stop")
                self.log(f"stopped at step {st.global_step}: checkpoint saved in {self.ckpts.dir}")
                return self.after_stop()
            epoch_done = st.step_in_epoch >= self.steps_per_epoch
            last = self.reached_max_steps() or (epoch_done and st.epoch + 1 >= cfg.train.epochs)
            result = None
            if last or (epoch_done and (st.epoch + 1) % cfg.train.eval_every_epochs == 0):
                result = self.evaluate(st.epoch)
            if epoch_done:
                st.epoch += 1
                st.step_in_epoch = 0
                st.epoch_loss_sum, st.epoch_correct, st.epoch_samples = 0.0, 0, 0
            st.finished = last
            self.ckpts.save(reason="final" if last else "epoch", accuracy=result["accuracy"] if result else None)
        self.export()
        self.summary(time.time() - t_start)
        return 0

    def after_stop(self) -> int:
        """After the stop checkpoint: requeue the SLURM job on its time-limit signal, then exit."""
        from distrain import signals

        # Every rank agrees (SLURM's USR1 may reach the nodes at slightly different times, so rank 0 may not
        # have its own yet) and has its share of the checkpoint behind it before the requeue: SLURM sends
        # SIGTERM to the whole job right after `scontrol requeue`.
        requeue = self.any_rank(self.signals is not None and self.signals.requeue)
        self.accelerator.wait_for_everyone()
        if requeue and self.is_main:
            try:
                signals.requeue_slurm_job()
                self.log(f"requeued SLURM job {signals.slurm_job_ref()}")
            except Exception as e:  # noqa: BLE001 - the checkpoint is safe; say why the requeue failed
                self.log(f"warning: could not requeue the SLURM job: {e}")
        return signals.EXIT_STOPPED

    def reached_max_steps(self) -> bool:
        return self.cfg.train.max_steps is not None and self.state.global_step >= self.cfg.train.max_steps

    def train_one_epoch(self, epoch: int) -> bool:
        """One epoch from `state.step_in_epoch` on; returns True when a stop was requested."""
        cfg, st, acc = self.cfg, self.state, self.accelerator
        plan = self.plan(epoch)
        self.train_data.set_epoch(plan, start_micro=st.step_in_epoch * cfg.train.grad_accum_steps)
        self.maybe_unfreeze(epoch)
        self.model.train()
        self._frozen_bn_eval()
        batches = iter(self.train_data)
        ds = self.is_deepspeed
        # Accelerate's optimizer wrapper costs ~0.1 ms of Python per step (package look-ups, inspect.signature);
        # without a GradScaler or DeepSpeed its step/zero_grad are exactly the wrapped optimizer's, so call that.
        opt = self.optimizer if ds or self.optimizer.scaler is not None else self.optimizer.optimizer
        # Sums on the device, read only at log intervals: no host synchronisation per step.
        run_loss = torch.zeros((), device=self.device)
        run_correct = torch.zeros((), device=self.device, dtype=torch.long)
        run_samples = 0
        t0, seen_since = time.time(), 0
        trace = [] if cfg.log.trace_samples else None
        first_step = st.step_in_epoch

        def fold() -> None:
            """Move the device-side running sums into the epoch totals (one host sync) and restart them."""
            nonlocal run_samples
            self._fold_running(run_loss, run_correct, run_samples)
            run_loss.zero_(), run_correct.zero_()
            run_samples = 0

        def save_trace() -> None:
            if trace is not None:
                self._write_trace(f"train-epoch{epoch}-from{first_step}", trace)

        self.progress.start_epoch(epoch, plan.num_steps, st.step_in_epoch, epochs=cfg.train.epochs,
                                  global_step=st.global_step, run_total_steps=self.total_steps)
        for step in range(st.step_in_epoch, plan.num_steps):
            step_total = plan.step_samples(step)
            micro = plan.micro_batches_of_step(step)
            for j, _ in enumerate(micro):
                x, y, idx = next(batches)
                if st.global_step == 0 and j == 0 and self.is_main:
                    self._log_first_batch(x)  # TensorBoard: what the network sees, once per run
                if trace is not None:
                    trace.append(idx.tolist())
                last = j == len(micro) - 1
                if ds:
                    # DeepSpeed: accelerator.backward() runs engine.backward(), and on the step's last micro-batch
                    # (sync_gradients) engine.step(): clip, optimizer step, zero_grad. The loss below is already
                    # scaled for the whole step, so DeepSpeed must not divide it by its accumulation steps again.
                    acc.sync_gradients = last
                with contextlib.nullcontext() if last else acc.no_sync(self.model):
                    # Under DeepSpeed with bf16/fp16 the module itself is 16-bit: autocast casts the fp32 inputs.
                    with autocast(self.device.type, self.rt.precision) if ds else contextlib.nullcontext():
                        logits = self.model(x)
                    loss_sum = F.cross_entropy(logits.float(), y, reduction="sum",
                                               label_smoothing=cfg.train.label_smoothing)
                    acc.backward(loss_sum * (self.world / step_total), **({"scale_wrt_gas": False} if ds else {}))
                run_loss += loss_sum.detach()
                run_correct += (logits.detach().argmax(1) == y).sum()
                run_samples += len(y)
            if cfg.train.grad_clip is not None and not ds:  # DeepSpeed clipped in engine.step()
                acc.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
            opt.step()  # a no-op under DeepSpeed (done in accelerator.backward)
            if not acc.optimizer_step_was_skipped:
                self.scheduler.step()
            opt.zero_grad(set_to_none=True)
            st.step_in_epoch = step + 1
            st.global_step += 1
            seen_since += step_total
            self.progress.tick(st.step_in_epoch, st.global_step)

            if st.global_step % cfg.log.every_steps == 0 or st.step_in_epoch == plan.num_steps:
                fold()
                dt = time.time() - t0
                self.log_step(epoch, seen_since / max(dt, 1e-9))
                t0, seen_since = time.time(), 0
            # (The epoch's last step and the max_steps one are saved by fit() right after: no duplicate.)
            if (cfg.checkpoint.every_steps and st.global_step % cfg.checkpoint.every_steps == 0
                    and st.step_in_epoch < plan.num_steps and not self.reached_max_steps()):
                fold()
                save_trace()  # what the checkpoint covers; trimmed to the resume point on resume
                self.ckpts.save(reason="every_steps")
            if self.stop_requested():
                fold()
                save_trace()
                return True
            if self.reached_max_steps():
                break
        fold()
        save_trace()
        self.progress.end_epoch()
        self.log_epoch(epoch)
        return False

    def _write_trace(self, name: str, indices: list) -> None:
        """log.trace_samples: the dataset indices this rank used, in order (auditing data order and sharding)."""
        import json

        d = self.run_dir / "trace"
        d.mkdir(exist_ok=True)
        (d / f"{name}-rank{self.rank}.json").write_text(json.dumps(indices))

    def _fold_running(self, loss: torch.Tensor, correct: torch.Tensor, samples: int) -> None:
        st = self.state
        loss_sum = float(loss.item())
        st.epoch_loss_sum += loss_sum
        st.epoch_correct += int(correct.item())
        st.epoch_samples += samples
        self._last_interval = (loss_sum, samples)

    def stop_requested(self) -> bool:
        """Hook for preemption signals (set by the CLI); all ranks agree before anyone stops."""
        signals = getattr(self, "signals", None)
        if signals is None:
            return False
        if self.state.global_step % self.stop_check_every != 0:
            return False
        return self.any_rank(signals.requested)

    def _reduce_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        return t.tolist()

    def log_step(self, epoch: int, img_per_s: float) -> None:
        loss_sum, n = self._last_interval
        loss_sum, n = self._reduce_sum([loss_sum, float(n)])
        loss = loss_sum / n if n else float("nan")
        lr = self.scheduler.get_last_lr()[0]
        if n and not math.isfinite(loss) and not getattr(self, "_warned_nonfinite", False):
            self._warned_nonfinite = True
            self.log(f"warning: the training loss is {loss} at step {self.state.global_step}: the run diverged; "
                     f"lower train.lr (now {self.cfg.train.lr}), add train.warmup_steps or train.grad_clip")
        self.progress.update(self.state.step_in_epoch, loss=loss, img_per_s=img_per_s, lr=lr,
                             global_step=self.state.global_step)
        self.metrics.scalars(self.state.global_step, **{"train/loss": loss, "train/lr": lr, "train/images_per_s": img_per_s})
        self._note_peak_memory()  # before gpu_memory() resets CUDA's peak counter
        self.metrics.gpu_memory(self.state.global_step, self.device)

    def _note_peak_memory(self) -> None:
        if self.device.type == "cuda":
            self._peak_mem = max(getattr(self, "_peak_mem", 0), torch.cuda.max_memory_allocated(self.device))

    def _epoch_peak_memory_gib(self) -> list[float]:
        """This epoch's peak torch.cuda.max_memory_allocated of every rank, in GiB (collective)."""
        self._note_peak_memory()
        t = torch.tensor([self._peak_mem / 2**30], dtype=torch.float64, device=self.device)
        self._peak_mem = 0
        torch.cuda.reset_peak_memory_stats(self.device)
        if self.world > 1:
            t = self.accelerator.gather(t)
        return [round(v, 3) for v in t.tolist()]

    def _log_first_batch(self, x: torch.Tensor) -> None:
        """The first training batch as TensorBoard sees it: augmented, de-normalised, one grid."""
        mean, std = normalization(self.cfg)
        self.metrics.image_grid("train/augmented_batch", x, mean, std, step=0)

    def log_epoch(self, epoch: int) -> None:
        st = self.state
        loss_sum, correct, n = self._reduce_sum([st.epoch_loss_sum, float(st.epoch_correct), float(st.epoch_samples)])
        rec = {"epoch": epoch, "step": st.global_step, "loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1),
               "samples": int(n), "lr": self.scheduler.get_last_lr()[0]}
        if self.device.type == "cuda":  # peak allocated GPU memory of the epoch: the largest device, and each one
            per_device = self._epoch_peak_memory_gib()
            rec["peak_mem_gib"], rec["peak_mem_gib_per_device"] = max(per_device), per_device
        self.metrics.log("train", **rec)
        self.metrics.scalars(st.global_step, **{"train/epoch_loss": rec["loss"], "train/epoch_accuracy": rec["accuracy"]})
        self.log(f"epoch {epoch + 1}/{self.cfg.train.epochs} train: loss {rec['loss']:.4f} accuracy {rec['accuracy']:.4f} "
                 f"({int(n)} images)")

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict:
        """Loss and accuracy over the whole test split, each image counted exactly once."""
        model = self.unwrapped()  # no DDP hooks: ranks may run different batch counts
        was_training = model.training
        model.eval()
        trace = [] if self.cfg.log.trace_samples else None
        cm, loss_sum = eval_loop(model, self.test_data, self.accelerator, self.cfg.model.num_classes,
                                 self.rt.precision, trace)
        if trace is not None:
            self._write_trace(f"eval-epoch{epoch}", trace)
        model.train(was_training)
        n = int(cm.sum().item())
        result = {"epoch": epoch, "step": self.state.global_step, "loss": loss_sum.item() / max(n, 1),
                  "accuracy": cm.diag().sum().item() / max(n, 1), "samples": n}
        self.metrics.log("eval", **result)
        self.metrics.scalars(self.state.global_step, **{"eval/loss": result["loss"], "eval/accuracy": result["accuracy"]})
        self.last_eval = {**result, "confusion": cm.cpu()}
        self.metrics.confusion(self.state.global_step, self.last_eval["confusion"], self.test_split.classes)
        self.log(f"epoch {epoch + 1}/{self.cfg.train.epochs} eval:  loss {result['loss']:.4f} accuracy {result['accuracy']:.4f} "
                 f"({n} images)")
        if self.state.best_accuracy is None or result["accuracy"] > self.state.best_accuracy:
            self.state.best_accuracy, self.state.best_step = result["accuracy"], self.state.global_step
        return result

    # -- end --------------------------------------------------------------------------------------
    def export(self) -> None:
        def write():
            if self.is_main:
                sd = self.model_state_dict()
                mean, std = normalization(self.cfg)
                export_model(self.run_dir, sd, model_info(self.cfg, self.train_split.classes, mean, std))

        self.accelerator.wait_for_everyone()
        self._agree("export the model", write, main_only=True)

    def banner(self) -> None:
        """What is about to run, as it will actually run (main process; also TensorBoard text 'run')."""
        c, st = self.cfg, self.state
        total, trainable = self.num_params
        w = self.world
        if self.rt.device == "cuda":
            devices = f"{w} x {torch.cuda.get_device_name(self.device)} (one process per GPU)"
        else:
            n = torch.get_num_threads()
            devices = f"{w} CPU process{'es' if w > 1 else ''}, {n} thread{'s' if n > 1 else ''} each"
        precision = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast with loss scaling"}.get(
            self.rt.precision, self.rt.precision)
        steps = f"{c.train.epochs} epoch{'s' if c.train.epochs > 1 else ''} x {self.steps_per_epoch} steps"
        if c.train.max_steps is not None and c.train.max_steps < c.train.epochs * self.steps_per_epoch:
            steps += f", stopping at train.max_steps={c.train.max_steps}"
        lines = [
            f"distrain train: {c.model.name} on {c.data.name}",
            f"  devices     {devices}; world size {w}",
            f"  precision   {precision} - {self.rt.note}",
            f"  batch       global {self.global_batch} = {c.train.batch_size} per process x {w} process{'es' if w > 1 else ''}"
            f" x {c.train.grad_accum_steps} accumulation step{'s' if c.train.grad_accum_steps > 1 else ''}",
            f"  data        {len(self.train_split):,} train / {len(self.test_split):,} test images, "
            f"{len(self.train_split.classes)} classes, augmentation {'on' if c.data.augment else 'off'}",
            f"  model       {total:,} parameters ({trainable:,} trainable)",
            f"  schedule    {steps} = {self.total_steps} optimizer steps; {c.train.optimizer} lr {c.train.lr:g}, "
            f"{c.train.scheduler} schedule",
            f"  run dir     {self.run_dir.resolve()}",
        ]
        if st.global_step:
            lines.append(f"  resumed     at epoch {st.epoch + 1}, step {st.global_step} of {self.total_steps}")
        self.log("\n".join(lines))
        self.metrics.text("run", "\n".join("    " + l for l in lines), st.global_step)
        self.metrics.config(c, st.global_step)
        self.metrics.log("start", world_size=self.world, device=self.rt.device, precision=self.rt.precision,
                         global_batch=self.global_batch, train_samples=len(self.train_split),
                         test_samples=len(self.test_split), parameters=total, resumed_step=st.global_step)

    def summary(self, seconds: float) -> None:
        st = self.state
        last = getattr(self, "last_eval", None)
        final = f"{last['accuracy']:.4f} (loss {last['loss']:.4f})" if last else "n/a"
        best = f"{st.best_accuracy:.4f} at step {st.best_step}" if st.best_accuracy is not None else "n/a"
        d = self.run_dir.resolve()
        m, s = divmod(seconds, 60)
        lines = [
            f"distrain train: done in {int(m)} min {s:.1f} s" if m else f"distrain train: done in {s:.1f} s",
            f"  accuracy    final {final}, best {best}",
            f"  model       {d / 'model.safetensors'} (+ model.json)",
            f"  checkpoints {d / 'checkpoints'}",
            f"  metrics     {d / 'metrics.jsonl'}",
        ]
        if self.cfg.log.tensorboard:
            lines.append(f"  tensorboard tensorboard --logdir {d / 'tb'}")
        lines.append(f"  next        distrain eval --checkpoint {d}   |   distrain predict --checkpoint {d} IMAGE ...")
        self.log("\n".join(lines))
        self.metrics.hparams(self.hparams(), {
            "hparam/final_accuracy": last["accuracy"] if last else None,
            "hparam/final_loss": last["loss"] if last else None,
            "hparam/best_accuracy": st.best_accuracy,
        }, step=st.global_step)
        self.metrics.log("end", step=st.global_step, seconds=round(seconds, 3),
                         final_accuracy=last["accuracy"] if last else None, best_accuracy=st.best_accuracy)
        self.metrics.close()

    def hparams(self) -> dict:
        """Flat config for TensorBoard's HPARAMS tab (paths, logging switches and nulls left out), plus what ran."""
        skip = {"output_dir", "resume", "data.root", "model.weights_path", "data.num_workers", "data.loader"}
        out: dict = {}

        def flat(d: dict, prefix: str = "") -> None:
            for k, v in d.items():
                if isinstance(v, dict):
                    flat(v, prefix + k + ".")
                elif v is not None and prefix + k not in skip and not (prefix + k).startswith(("log.", "checkpoint.")):
                    out[prefix + k] = v

        flat(self.cfg.to_dict())
        out.update({"run.world_size": self.world, "run.global_batch": self.global_batch,
                    "run.device": self.rt.device, "run.precision": self.rt.precision})
        return out


@torch.no_grad()
def eval_loop(model, data: InputPipeline, accelerator, num_classes: int, precision: str = "no",
              trace: Optional[list] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Confusion matrix and summed loss over the whole split, reduced over ranks (each image once)."""
    device = accelerator.device
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for x, y, idx in data:
        with autocast(device.type, precision):
            logits = model(x)
        if trace is not None:
            trace.extend(idx.tolist())
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        cm += confusion_matrix(logits.argmax(1), y, num_classes)
    if accelerator.num_processes > 1:
        cm = accelerator.reduce(cm, reduction="sum")
        loss_sum = accelerator.reduce(loss_sum, reduction="sum")
    return cm, loss_sum


def run_eval(path: str, overrides: list[str], confusion_dir: Optional[str] = None) -> Optional[dict]:
    """`distrain eval`: the test split through a trained model, on any world size; result on the main process."""
    from distrain.config import Config, apply_overrides, config_from_dict
    from distrain.export import load_model

    loaded = load_model(path)
    info = loaded.info
    cfg = config_from_dict(_data_keys(loaded.config)) if loaded.config else Config()
    cfg.model.name, cfg.model.num_classes = info["architecture"], info["num_classes"]
    cfg.model.input_size = info["input_size"][-1]
    cfg.model.pretrained, cfg.model.weights_path = False, None
    cfg = apply_overrides(cfg, overrides)
    rt = resolve_runtime(cfg.train.device, cfg.train.mixed_precision)
    acc = make_accelerator(rt)
    t = _EvalContext(acc)
    if confusion_dir:  # an unwritable report directory fails on every rank before the evaluation, not after
        from distrain.report import prepare_dir

        t._agree("create the --confusion directory", lambda: prepare_dir(Path(confusion_dir)), main_only=True)
    t._agree("prepare the data", lambda: prepare_data(cfg), main_only=True)
    split = t._agree("load the test data", lambda: load_split(cfg, train=False))
    data = InputPipeline(split, cfg, acc.device, acc.process_index, acc.num_processes, train=False,
                         eval_batch_size=max(cfg.train.batch_size, 256), mean_std=(info["mean"], info["std"]))
    model = loaded.model.to(acc.device).eval()
    cm, loss_sum = eval_loop(model, data, acc, cfg.model.num_classes, rt.precision)
    close_distributed(acc)  # the last collective is behind every rank
    if not acc.is_main_process:
        return None
    n = int(cm.sum().item())
    from distrain.metrics import per_class_accuracy

    classes = info.get("classes") or [str(i) for i in range(cfg.model.num_classes)]
    result = {"accuracy": cm.diag().sum().item() / max(n, 1), "loss": loss_sum.item() / max(n, 1), "samples": n,
              "dataset": cfg.data.name, "checkpoint": str(loaded.source), "world_size": acc.num_processes,
              "per_class_accuracy": dict(zip(classes, per_class_accuracy(cm.cpu()))),
              "confusion": cm.cpu()}
    if confusion_dir:
        from distrain.report import write_confusion

        write_confusion(Path(confusion_dir), cm.cpu(), classes)
    return result


def _data_keys(run_cfg: dict) -> dict:
    """The parts of a training run's config that eval reuses (data location and format, batch, device)."""
    keep = {"data": run_cfg.get("data", {}), "train": {k: v for k, v in run_cfg.get("train", {}).items()
                                                        if k in ("batch_size", "seed", "device", "mixed_precision")},
            "model": {k: v for k, v in run_cfg.get("model", {}).items() if k in ("channels_last",)}}
    return keep


class _EvalContext:
    """Just enough of a Trainer for `_agree` outside training."""

    def __init__(self, acc):
        self.accelerator, self.rank, self.world = acc, acc.process_index, acc.num_processes
        self.is_main = acc.is_main_process

    _agree = Trainer._agree


def close_distributed(accelerator) -> None:
    """End distribution (all ranks, after their last collective) so that no thread of the collective library is
    busy when the interpreter finalizes.

    torch + gloo (pytorch/pytorch#190489, #179291): a gloo worker thread lets go of a finished collective a little
    after the collective returned; if its tensors belong to Python, that needs the GIL, and if the interpreter is
    finalizing by then, the thread ends inside a C++ destructor and std::terminate aborts the process ("terminate
    called without an active exception", SIGABRT): a run that finished or stopped cleanly reports -6 for a rank
    (seen on a busy host, about one 2-process run in 25; the core shows ProcessGroupGloo::runLoop ->
    ~AsyncAllgatherWork -> take_gil during Py_FinalizeEx). The group cannot simply be freed (DDP leaves references to
    it behind), so: destroy it, then hold the GIL back until no other thread of this process is runnable (bounded).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    accelerator.end_training()  # destroy_process_group()
    _let_threads_settle()


def _let_threads_settle(timeout: float = 2.0, poll: float = 0.02) -> None:
    """Sleep (GIL released) until no thread of this process but the caller is runnable, or ``timeout`` passed.

    A thread waiting for the GIL gets it while we sleep; one that is runnable (state R in /proc) still has work to
    do. Without /proc (not Linux) it just sleeps ``poll`` once.
    """
    me = str(threading.get_native_id())
    tasks = Path("/proc/self/task")
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(poll)
        if not tasks.is_dir() or time.monotonic() > deadline:
            return
        busy = False
        for t in tasks.iterdir():
            if t.name == me:
                continue
            try:
                state = (t / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            busy = busy or state == "R"
        if not busy:
            return


def train(cfg: Config, signals=None) -> int:
    trainer = Trainer(cfg)
    trainer.signals = signals
    try:
        trainer.setup()
        code = trainer.fit()
        close_distributed(trainer.accelerator)  # every rank is here: after the export, or the stop and its barrier
        return code
    finally:
        trainer.progress.close()
        if hasattr(trainer, "metrics"):
            trainer.metrics.close()


def wait_for_ranks_to_report(timeout: float = 10.0) -> None:
    """After this rank printed its error under a multi-process launch, wait (bounded) until every rank has.

    torchrun / `accelerate launch` terminate the other workers as soon as one exits, which could cut
    off a rank that has not printed its message yet. Each rank counts itself in the launcher's store
    (or the process group's) and leaves when all have, or after ``timeout`` seconds (a rank that fails
    alone must not hang). Without a reachable store, a short grace period does the same job.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return
    from datetime import timedelta

    store = None
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            store = dist.distributed_c10d._get_default_store()
        elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and os.environ.get("MASTER_ADDR"):
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=timedelta(seconds=timeout), wait_for_workers=False)
    except Exception:  # noqa: BLE001 - best effort: fall back to the grace period
        store = None
    if store is None:
        time.sleep(min(timeout, 3.0))
        return
    key = f"distrain/user-error/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    deadline = time.monotonic() + timeout
    try:
        store.add(key, 1)
        while time.monotonic() < deadline and int(store.add(key, 0)) < world:
            time.sleep(0.01)
    except Exception:  # noqa: BLE001 - the store went away (the launcher is ending): nothing left to wait for
        pass
