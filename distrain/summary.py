"""What a run says about itself: the start banner, the end summary and the flat hparams record.

Pure text from a trainer's state; nothing here computes, writes or talks to other ranks.
"""

from __future__ import annotations

import torch


def banner_lines(t) -> list[str]:
    """What is about to run, as it will actually run (main process; also TensorBoard text 'run')."""
    c, st, s, p = t.cfg, t.state, t.strategy, t.parts
    total, trainable = t.num_params
    w = s.world
    if s.device.type == "cuda":
        devices = f"{w} x {torch.cuda.get_device_name(s.device)} (one process per GPU)"
    else:
        n = torch.get_num_threads()
        devices = f"{w} CPU process{'es' if w > 1 else ''}, {n} thread{'s' if n > 1 else ''} each"
    precision = {"no": "fp32", "bf16": "bf16 autocast",
                 "fp16": "fp16 autocast with loss scaling"}.get(s.precision, s.precision)
    steps = f"{c.train.epochs} epoch{'s' if c.train.epochs > 1 else ''} x {p.steps_per_epoch} steps"
    if c.train.max_steps is not None and c.train.max_steps < c.train.epochs * p.steps_per_epoch:
        steps += f", stopping at train.max_steps={c.train.max_steps}"
    accum = c.train.grad_accum_steps
    lines = [
        f"distrain train: {c.model.name} on {c.data.name}",
        f"  devices     {devices}; world size {w}",
        f"  precision   {precision} - {s.rt.note}",
        f"  batch       global {s.global_batch} = {c.train.batch_size} per process x {w} "
        f"process{'es' if w > 1 else ''} x {accum} accumulation step{'s' if accum > 1 else ''}",
        f"  data        {len(p.train_split):,} train / {len(p.test_split):,} test images, "
        f"{len(p.train_split.classes)} classes, augmentation {'on' if c.data.augment else 'off'}",
        f"  model       {total:,} parameters ({trainable:,} trainable)",
        f"  schedule    {steps} = {p.total_steps} optimizer steps; {c.train.optimizer} lr "
        f"{c.train.lr:g}, {c.train.scheduler} schedule",
        f"  run dir     {t.run.path.resolve()}",
    ]
    if st.global_step:
        lines.append(f"  resumed     at epoch {st.epoch + 1}, step {st.global_step} of {p.total_steps}")
    return lines


def summary_lines(t, seconds: float) -> list[str]:
    st, last = t.state, t.last_eval
    final = f"{last.accuracy:.4f} (loss {last.loss:.4f})" if last else "n/a"
    best = f"{st.best_accuracy:.4f} at step {st.best_step}" if st.best_accuracy is not None else "n/a"
    d = t.run.path.resolve()
    m, s = divmod(seconds, 60)
    lines = [
        f"distrain train: done in {int(m)} min {s:.1f} s" if m else f"distrain train: done in {s:.1f} s",
        f"  accuracy    final {final}, best {best}",
        f"  model       {d / 'model.safetensors'} (+ model.json)",
        f"  checkpoints {d / 'checkpoints'}",
        f"  metrics     {d / 'metrics.jsonl'}",
    ]
    if t.cfg.log.tensorboard and "tensorboard" in t.cfg.log.trackers:
        lines.append(f"  tensorboard tensorboard --logdir {d / 'tb'}")
    lines.append(f"  next        distrain eval --checkpoint {d}   |   "
                 f"distrain predict --checkpoint {d} IMAGE ...")
    return lines


HPARAM_SKIP = {"output_dir", "resume", "data.root", "model.weights_path", "data.num_workers",
               "data.loader"}


def hparams(t) -> dict:
    """Flat config for TensorBoard's HPARAMS tab (paths, logging switches and nulls left out), plus
    what ran."""
    out: dict = {}

    def flat(d: dict, prefix: str = "") -> None:
        for k, v in d.items():
            key = prefix + k
            if isinstance(v, dict):
                flat(v, key + ".")
            elif v is not None and key not in HPARAM_SKIP and not key.startswith(("log.", "checkpoint.")):
                out[key] = v

    flat(t.cfg.to_dict())
    s = t.strategy
    out.update({"run.world_size": s.world, "run.global_batch": s.global_batch,
                "run.device": s.rt.device, "run.precision": s.precision})
    return out
