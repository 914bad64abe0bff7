"""The training loop: epochs of optimizer steps, on any world size, read top to bottom.

`fit` runs epochs; `train_one_epoch` runs steps; a step is `_micro_step` per micro-batch, then
`strategy.optimizer_step`, then `_after_step` (poll, logging, periodic checkpoint, stop). Everything
that decides *what* is computed lives here, so results do not depend on how many processes run:

- Data order and sharding come from `data.sampling.EpochPlan`; loaders are never given to Accelerate.
- Each micro-batch's loss is a *sum* scaled by ``world_size / images_in_this_optimizer_step``: after
  DDP averages over ranks, the gradient is the mean over exactly the images of the step.
- The LR scheduler is stepped here, once per optimizer step, and not on a skipped (fp16) step.
- Stop requests, divergence and data errors are agreed between ranks by `StepChecks` every few steps
  and always before a log line, a checkpoint or an epoch end; a diverged run writes no checkpoint
  or export and exits 2 naming train.lr.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn.functional as F

from distrain import trace
from distrain.build import Components
from distrain.checkpoint import NonFiniteWeights, Snapshot, rank_payload
from distrain.config import Config
from distrain.distributed import unwrap
from distrain.errors import UserError
from distrain.fsio import describe_os_error
from distrain.evaluate import EvalResult, eval_loop
from distrain.models import backbone_and_head, count_parameters
from distrain.signals import EXIT_STOPPED, requeue_slurm_job, slurm_job_ref
from distrain.state import TrainState
from distrain.step_checks import StepChecks
from distrain.step_log import StepLog


class Diverged(UserError):
    pass


class RunningSums:
    """Loss, correct predictions and images since the last poll, kept on the device (no host sync
    per step) and folded into the epoch totals at a poll."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.samples = 0

    def add(self, loss_sum: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss += loss_sum.detach()
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.samples += len(y)

    def fold_into(self, st: TrainState) -> tuple[float, int]:
        """Add to the epoch totals and start again; (loss sum, images) of the interval."""
        loss, n = float(self.loss.item()), self.samples
        st.epoch_loss_sum += loss
        st.epoch_correct += int(self.correct.item())
        st.epoch_samples += n
        self.loss.zero_(), self.correct.zero_()
        self.samples = 0
        return loss, n


class Trainer:
    def __init__(self, cfg: Config, strategy, parts: Components, run, progress, signals=None):
        self.cfg, self.strategy, self.parts = cfg, strategy, parts
        self.run, self.progress, self.signals = run, progress, signals
        self.metrics = run.metrics
        self.state = TrainState()
        self.model = parts.model
        self.checks = StepChecks(strategy, signals)
        self.step_limit = cfg.train.max_steps  # `distrain bench` sets its own
        self.tracing = cfg.log.trace_samples and run.record_traces
        self.unfrozen = False
        self.last_eval: Optional[EvalResult] = None
        self.num_params = count_parameters(unwrap(self.model))
        self.report = StepLog(cfg, strategy, self.metrics, progress, parts.scheduler)

    def log(self, msg: str) -> None:
        self.progress.write(msg)

    def plan(self, epoch: int):
        return self.parts.plan(epoch, self.strategy.rank, self.strategy.world)

    def reached_max_steps(self) -> bool:
        return self.step_limit is not None and self.state.global_step >= self.step_limit

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> int:
        """Train to the end or to a requested stop; returns the process exit code."""
        cfg, st = self.cfg, self.state
        t_start = time.time()
        self.sanity_eval()
        if st.epoch >= cfg.train.epochs or self.reached_max_steps():
            st.finished = True  # e.g. resumed with a shorter schedule than the checkpoint's
        while not st.finished:
            if self.train_one_epoch(st.epoch):
                self.save("stop")
                self.metrics.log("stopped", step=st.global_step, epoch=st.epoch,
                                 signal=self.signals.reason if self.signals else None)
                self.log(f"stopped at step {st.global_step}: checkpoint saved in {self.run.store.dir}")
                return self.after_stop()
            epoch_done = st.step_in_epoch >= self.parts.steps_per_epoch
            last = self.reached_max_steps() or (epoch_done and st.epoch + 1 >= cfg.train.epochs)
            result = None
            if last or (epoch_done and (st.epoch + 1) % cfg.train.eval_every_epochs == 0):
                result = self.evaluate(st.epoch)
            if epoch_done:
                st.next_epoch()
            st.finished = last
            self.save("final" if last else "epoch", result.accuracy if result else None)
        self.export()
        self.report.end(self, time.time() - t_start)
        return 0

    def train_one_epoch(self, epoch: int) -> bool:
        """One epoch from `state.step_in_epoch` on; True when a stop was requested."""
        st = self.state
        plan = self.plan(epoch)
        accum = self.cfg.train.grad_accum_steps
        self.parts.train_data.set_epoch(plan, start_micro=st.step_in_epoch * accum)
        self.maybe_unfreeze(epoch)
        self.model.train()
        self._frozen_bn_eval()
        batches = iter(self.parts.train_data)
        sums = RunningSums(self.strategy.device)
        traced = [] if self.tracing else None
        first_step = st.step_in_epoch
        self.progress.start_epoch(epoch, plan.num_steps, st.step_in_epoch, epochs=self.cfg.train.epochs,
                                  global_step=st.global_step, run_total_steps=self.parts.total_steps)
        self.checks.reset_clock()
        self.report.start_epoch()
        stop = False
        for step in range(st.step_in_epoch, plan.num_steps):
            micro = plan.micro_batches_of_step(step)
            scale = self.strategy.world / plan.step_samples(step)
            for j in range(len(micro)):
                x, y, idx = self._next_batch(batches)
                if traced is not None:
                    traced.append(idx.tolist())
                self._micro_step(x, y, last=j == len(micro) - 1, scale=scale, sums=sums)
            if self.strategy.optimizer_step(self.model):
                self.parts.scheduler.step()
            st.step_in_epoch, st.global_step = step + 1, st.global_step + 1
            self.report.step_done(st, plan.step_samples(step))
            stop = self._after_step(plan, sums, traced, first_step)
            if stop or self.reached_max_steps():
                break
        if traced is not None:
            trace.write(self.run.path, trace.train_name(epoch, first_step, self.strategy.rank), traced)
        if stop:
            return True
        self.progress.end_epoch()
        self.report.epoch(epoch, st)
        return False

    def _next_batch(self, batches):
        """The next micro-batch; after a data error on this rank, empty batches until the ranks
        agree on it (the others are in the step's collectives and must not be left waiting)."""
        if self.checks.data_error is None:
            try:
                x, y, idx = next(batches)
                if self.state.global_step == 0 and self.strategy.is_main and not hasattr(self, "_shown"):
                    self._shown = True
                    self.metrics.image_grid("train/augmented_batch", x, *self.parts.mean_std, step=0)
                return x, y, idx
            except UserError as e:
                if self.strategy.world == 1:
                    raise
                self.checks.data_error = e
        size = self.cfg.model.input_size
        dev = self.strategy.device
        empty = torch.zeros((0,), dtype=torch.long, device=dev)
        return torch.zeros((0, 3, size, size), device=dev), empty, empty.cpu()

    def _micro_step(self, x, y, last: bool, scale: float, sums: RunningSums) -> None:
        with self.strategy.micro_step(self.model, last):
            logits = self.model(x)
            loss_sum = F.cross_entropy(logits.float(), y, reduction="sum",
                                       label_smoothing=self.cfg.train.label_smoothing)
            self.strategy.backward(loss_sum * scale)
        sums.add(loss_sum, logits, y)

    def _after_step(self, plan, sums: RunningSums, traced, first_step: int) -> bool:
        """Poll, log, checkpoint; True when every rank agreed to stop."""
        cfg, st = self.cfg, self.state
        epoch_end = st.step_in_epoch == plan.num_steps or self.reached_max_steps()
        log_now = self.progress.should_log(st.step_in_epoch, plan.num_steps) or epoch_end
        every = cfg.checkpoint.every_steps
        # (The epoch's last step and the max_steps one are saved by fit(): no duplicate.)
        ckpt_now = bool(every) and st.global_step % every == 0 and not epoch_end
        if not self.checks.step_done(forced=log_now or ckpt_now or epoch_end):
            return False
        loss, n = sums.fold_into(st)
        verdict = self.checks.poll(loss, self.report.fold(loss, n))
        if verdict.data_error:
            self.checks.raise_data_error()
        if verdict.diverged:
            self.diverged()
        if log_now:
            self.report.line(st, *verdict.sums)
        if ckpt_now:
            if traced is not None:  # what the checkpoint covers; trimmed to the resume point on resume
                trace.write(self.run.path, trace.train_name(st.epoch, first_step, self.strategy.rank),
                            traced)
            self.save("every_steps")
            self.checks.reset_clock()
        return verdict.stop

    def diverged(self) -> None:
        st = self.state
        good = self.run.store.list() if self.run.store else []
        self.metrics.log("diverged", step=st.global_step, epoch=st.epoch, key="train.lr")
        where = f"; the last good checkpoint '{good[-1]}' stays the resume point" if good else ""
        raise Diverged(f"training diverged: the loss is not finite at step {st.global_step} (epoch "
                       f"{st.epoch + 1}); lower config key 'train.lr' (now {self.cfg.train.lr:g}), or "
                       f"set train.warmup_steps or train.grad_clip{where}")

    # -- evaluation -----------------------------------------------------------------------------
    def sanity_eval(self) -> None:
        """train.sanity_eval_batches: a broken eval path or test split fails in seconds, not after
        an epoch (as Lightning's sanity check does); nothing is recorded."""
        k = self.cfg.train.sanity_eval_batches
        if not k:
            return
        model = unwrap(self.model)
        was_training = model.training
        model.eval()
        eval_loop(model, self.parts.test_data, self.strategy, self.cfg.model.num_classes, max_batches=k)
        model.train(was_training)

    def evaluate(self, epoch: int) -> EvalResult:
        """Loss and accuracy over the whole test split, each image counted exactly once."""
        model = unwrap(self.model)  # no DDP hooks: ranks may run different batch counts
        was_training = model.training
        model.eval()
        traced = [] if self.tracing else None
        res = eval_loop(model, self.parts.test_data, self.strategy, self.cfg.model.num_classes, traced)
        if traced is not None:
            trace.write(self.run.path, trace.eval_name(epoch, self.strategy.rank), traced)
        model.train(was_training)
        st = self.state
        self.report.evaluation(epoch, st, res, self.parts.test_split.classes)
        if st.best_accuracy is None or res.accuracy > st.best_accuracy:
            st.best_accuracy, st.best_step = res.accuracy, st.global_step
        self.last_eval = res
        self.checks.reset_clock()
        return res

    # -- fine-tuning ----------------------------------------------------------------------------
    def maybe_unfreeze(self, epoch: int) -> None:
        """model.unfreeze_after_epochs: from that epoch on, train the backbone too (also right after
        a resume). The optimizer already holds the backbone (see optim.param_groups)."""
        n = self.cfg.model.unfreeze_after_epochs
        if n is None or self.unfrozen or epoch < n:
            return
        for p in backbone_and_head(unwrap(self.model))[0]:
            p.requires_grad_(True)
        self.model = self.strategy.rewrap(self.model)
        self.unfrozen = True
        self.num_params = count_parameters(unwrap(self.model))
        self.log(f"epoch {epoch + 1}: backbone unfrozen (model.unfreeze_after_epochs={n}); "
                 f"{self.num_params[1]:,} trainable parameters")

    def _frozen_bn_eval(self) -> None:
        """BatchNorm layers of a frozen backbone keep their statistics: eval mode while frozen."""
        if not self.cfg.model.freeze_features or self.unfrozen:
            return
        for m in unwrap(self.model).modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) \
                    and not any(p.requires_grad for p in m.parameters()):
                m.eval()

    # -- checkpoints, export, end ---------------------------------------------------------------
    def snapshot(self, model_state: dict) -> Snapshot:
        s, p = self.strategy, self.parts
        return Snapshot(self.state, model_state,
                        s.optimizer_state(p.optimizer), p.scheduler.state_dict(), s.scaler_state(),
                        self.cfg.to_dict(), self.run.model_info, s.world, s.global_batch,
                        len(p.train_split))

    def save(self, reason: str, accuracy: Optional[float] = None) -> None:
        """A checkpoint of this instant (collective); refuses a diverged model."""
        store = self.run.store
        if store is None:  # `distrain bench`
            return
        started = time.time()
        shard = self.strategy.optimizer_shard(self.parts.optimizer)
        model_state = self.strategy.model_state_dict(self.model)  # every rank: a gather under FSDP
        try:
            path = store.save(self.strategy, lambda: rank_payload(self.state, shard),
                              lambda: self.snapshot(model_state), reason, accuracy)
        except NonFiniteWeights:
            self.diverged()
        self.metrics.log("checkpoint", step=self.state.global_step, reason=reason, path=str(path),
                         seconds=round(time.time() - started, 3))

    def export(self) -> None:
        from distrain.export import export_model
        from distrain.state_dicts import clean_state_dict, non_finite

        full = self.strategy.model_state_dict(self.model)  # every rank: a gather under FSDP

        def write():
            if self.strategy.is_main:
                sd = clean_state_dict(full)
                if non_finite(sd) is not None:
                    self.diverged()
                try:
                    export_model(self.run.path, sd, self.run.model_info)
                except OSError as e:
                    raise UserError(f"cannot write the exported model in '{self.run.path}': "
                                    f"{describe_os_error(e)}; the final checkpoint in "
                                    f"'{self.run.store.dir}' is complete (distrain eval and predict "
                                    f"accept it)") from None

        self.strategy.barrier()
        self.strategy.agree("export the model", write, main_only=True)
        self.metrics.artifact(self.run.path / "model.safetensors", self.run.path / "model.json")

    def after_stop(self) -> int:
        """After the stop checkpoint: requeue the SLURM job on its time-limit signal, then exit.

        Every rank agrees (SLURM's USR1 may reach the nodes at slightly different times) and has its
        share of the checkpoint behind it before the requeue: SLURM sends SIGTERM to the whole job
        right after `scontrol requeue`."""
        requeue = self.strategy.any(self.signals is not None and self.signals.requeue)
        self.strategy.barrier()
        if requeue and self.strategy.is_main:
            try:
                requeue_slurm_job()
                self.log(f"requeued SLURM job {slurm_job_ref()}")
            except Exception as e:  # noqa: BLE001 - the checkpoint is safe; say why the requeue failed
                self.log(f"warning: could not requeue the SLURM job: {e}")
        return EXIT_STOPPED
