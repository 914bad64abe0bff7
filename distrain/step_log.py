"""What the training loop reports: progress lines, metrics.jsonl records, TensorBoard points.

Invariants:
- Numbers are over all ranks: interval and epoch sums come reduced (the caller's poll, or one sum
  per epoch), images/s counts every rank's images of the steps in the interval.
- Only the main process writes (`MetricsLogger` and `Progress` are no-ops elsewhere), but every rank
  calls the same methods in the same order, since some of them are collectives.
"""

from __future__ import annotations

import time

import torch

from distrain import summary
from distrain.allocator import describe_current


class StepLog:
    def __init__(self, cfg, strategy, metrics, progress, scheduler):
        self.cfg, self.strategy, self.metrics = cfg, strategy, metrics
        self.progress, self.scheduler = progress, scheduler
        # Since the last line: this rank's loss sum and images, and the step images of all ranks.
        self.interval = [0.0, 0.0, 0.0]
        self._t = time.perf_counter()
        self._peak_mem = 0

    def start_epoch(self) -> None:
        self._t = time.perf_counter()

    def step_done(self, st, step_images: int) -> None:
        self.interval[2] += step_images
        self.progress.tick(st.step_in_epoch, st.global_step)

    def fold(self, loss_sum: float, samples: int) -> list[float]:
        """Add this rank's sums since the last poll; the interval's sums so far (to be reduced)."""
        self.interval[0] += loss_sum
        self.interval[1] += samples
        return self.interval[:2]

    def line(self, st, loss_sum: float, samples: float) -> None:
        """One progress line / TensorBoard point for the interval since the last one (``loss_sum``
        and ``samples`` are over all ranks)."""
        now = time.perf_counter()
        img_per_s = self.interval[2] / max(now - self._t, 1e-9)
        loss = loss_sum / samples if samples else float("nan")
        self._t, self.interval = now, [0.0, 0.0, 0.0]
        lr = self.scheduler.get_last_lr()[0]
        self.progress.update(st.step_in_epoch, loss=loss, img_per_s=img_per_s, lr=lr,
                             global_step=st.global_step)
        self.metrics.scalars(st.global_step, **{"train/loss": loss, "train/lr": lr,
                                                "train/images_per_s": img_per_s})
        self._note_peak_memory()  # before gpu_memory() resets CUDA's peak counter
        self.metrics.gpu_memory(st.global_step, self.strategy.device)

    def epoch(self, epoch: int, st) -> None:
        """The epoch's `train` record (collective: the totals are summed over ranks)."""
        loss_sum, correct, n = self.strategy.sum([st.epoch_loss_sum, float(st.epoch_correct),
                                                  float(st.epoch_samples)])
        rec = {"epoch": epoch, "step": st.global_step, "loss": loss_sum / max(n, 1),
               "accuracy": correct / max(n, 1), "samples": int(n),
               "lr": self.scheduler.get_last_lr()[0]}
        if self.strategy.device.type == "cuda":  # the epoch's peak GPU memory: largest and each device
            per_device = self._epoch_peak_memory_gib()
            rec["peak_mem_gib"], rec["peak_mem_gib_per_device"] = max(per_device), per_device
        self.metrics.log("train", **rec)
        self.metrics.scalars(st.global_step, **{"train/epoch_loss": rec["loss"],
                                                "train/epoch_accuracy": rec["accuracy"]})
        self.progress.write(f"epoch {epoch + 1}/{self.cfg.train.epochs} train: loss {rec['loss']:.4f} "
                            f"accuracy {rec['accuracy']:.4f} ({int(n)} images)")

    def evaluation(self, epoch: int, st, res, classes) -> None:
        self.metrics.log("eval", epoch=epoch, step=st.global_step, loss=res.loss,
                         accuracy=res.accuracy, samples=res.samples)
        self.metrics.scalars(st.global_step, **{"eval/loss": res.loss, "eval/accuracy": res.accuracy})
        self.metrics.confusion(st.global_step, res.confusion, classes)
        self.progress.write(f"epoch {epoch + 1}/{self.cfg.train.epochs} eval:  loss {res.loss:.4f} "
                            f"accuracy {res.accuracy:.4f} ({res.samples} images)")

    def _note_peak_memory(self) -> None:
        if self.strategy.device.type == "cuda":
            self._peak_mem = max(self._peak_mem, torch.cuda.max_memory_allocated(self.strategy.device))

    def _epoch_peak_memory_gib(self) -> list[float]:
        """This epoch's peak torch.cuda.max_memory_allocated of every rank, in GiB (collective)."""
        self._note_peak_memory()
        dev = self.strategy.device
        t = torch.tensor([self._peak_mem / 2**30], dtype=torch.float64, device=dev)
        self._peak_mem = 0
        torch.cuda.reset_peak_memory_stats(dev)
        return [round(v, 3) for v in self.strategy.gather(t).tolist()]

    # -- start and end of a run -----------------------------------------------------------------
    def start(self, t) -> None:
        """The banner, the config, the `start` record (main process writes)."""
        lines = summary.banner_lines(t)
        self.progress.write("\n".join(lines))
        self.metrics.text("run", "\n".join("    " + line for line in lines), t.state.global_step)
        self.metrics.config(self.cfg, t.state.global_step)
        s, p = self.strategy, t.parts
        self.metrics.log("start", world_size=s.world, device=s.rt.device, precision=s.precision,
                         global_batch=s.global_batch, train_samples=len(p.train_split),
                         test_samples=len(p.test_split), parameters=t.num_params[0],
                         resumed_step=t.state.global_step, malloc=describe_current())

    def end(self, t, seconds: float) -> None:
        st, last = t.state, t.last_eval
        self.progress.write("\n".join(summary.summary_lines(t, seconds)))
        final = {"hparam/final_accuracy": last.accuracy if last else None,
                 "hparam/final_loss": last.loss if last else None,
                 "hparam/best_accuracy": st.best_accuracy}
        self.metrics.hparams(summary.hparams(t), final, step=st.global_step)
        self.metrics.log("end", step=st.global_step, seconds=round(seconds, 3),
                         final_accuracy=last.accuracy if last else None,
                         best_accuracy=st.best_accuracy)
