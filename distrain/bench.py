"""`distrain bench`: images/s of the input pipeline alone and of the full training step.

Writes nothing. The components are built exactly as `distrain train` builds them (`build.build`:
data, model, optimizer, schedule, input pipelines, Accelerate/DDP, precision, channels_last,
compile), the Trainer gets outputs that go nowhere (no run directory, checkpoints, metrics or
TensorBoard), and the step is timed through the real loop (`Trainer.train_one_epoch`, with the
per-step polls, logging points and epoch ends train has), after the sanity evaluation train runs
first. The config is never changed.

- ``train_img_per_s``: the median of ``repeats`` windows of ``steps`` optimizer steps each, after
  the sanity evaluation train runs first and ``warmup`` steps (compilation, cuDNN autotuning,
  DataLoader workers settle in the warm-up), input pipeline included; ``train_windows_img_per_s``
  holds every window, ``timed`` says which steps of which epochs were timed. The median of several
  windows, not one long window: a burst of other load on a shared machine spoils one window, not the
  result. Nothing runs before the timed windows that train does not run (the pipeline-only phase
  comes after them), so the process is in the state train's steps are in.
- ``data_img_per_s``: micro-batches of the training plan through the input pipeline (gather or
  DataLoader, augmentation, normalisation, on the device) with nothing consuming them; median of
  ``repeats`` windows of ``max(steps x grad_accum_steps, 64)`` micro-batches after a warm-up.

Both are global (images over all ranks per second of the main process, timed between barriers, the
device synchronised), so under ``accelerate launch`` they are the job's throughput. With a known GPU
the result also holds achieved TFLOP/s (forward FLOPs per image counted with
``torch.utils.flop_counter.FlopCounterMode`` on the meta device, x3 for forward + backward) and MFU
against the GPU's dense bf16 peak (``PEAK_BF16_TFLOPS``; ``DISTRAIN_PEAK_TFLOPS`` overrides it).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from typing import Optional

import torch

from distrain.config import Config, expand_paths, load_config
from distrain.errors import UserError

# Dense (no sparsity) bf16 tensor-core peak per GPU, TFLOP/s, from the vendors' data sheets. Matched
# against torch.cuda.get_device_name() in order (more specific names first).
PEAK_BF16_TFLOPS: list[tuple[tuple[str, ...], float]] = [
    (("GH200",), 989.0),
    (("H200",), 989.0),
    (("H100", "PCIE"), 756.0),
    (("H100", "NVL"), 835.0),
    (("H100",), 989.0),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    (("H800", "PCIE"), 756.0),
    (("H800",), 989.0),
    (("A100",), 312.0),  # SXM4 and PCIe
    (("A800",), 312.0),
    (("L40S",), 362.0),
    (("A10G",), 70.0),
]


def peak_bf16_tflops(device_name: str) -> Optional[float]:
    """The dense bf16 peak of a GPU by its name, None when unknown."""
    env = os.environ.get("DISTRAIN_PEAK_TFLOPS")
    if env:
        try:
            return float(env)
        except ValueError:
            raise UserError(f"DISTRAIN_PEAK_TFLOPS must be a number of TFLOP/s, got {env!r}") \
                from None
    name = device_name.upper()
    for parts, tflops in PEAK_BF16_TFLOPS:
        if all(p in name for p in parts):
            return tflops
    return None


def forward_flops_per_image(cfg: Config) -> Optional[float]:
    """FLOPs of one image's forward pass (matmuls and convolutions), counted on the meta device:
    no compute."""
    from torch.utils.flop_counter import FlopCounterMode

    from distrain.models import build_from_config

    try:
        with torch.device("meta"):
            model = build_from_config(cfg.model)
            x = torch.empty(2, 3, cfg.model.input_size, cfg.model.input_size)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x)
        return counter.get_total_flops() / 2
    except Exception:  # noqa: BLE001 - a model the counter cannot trace: no FLOPs, not a failure
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_window(windows: list[tuple[float, float]]) -> tuple[float, float]:
    """The median of (images/s, seconds) windows by rate: the lower middle one for an even count,
    so the result is always a window that was measured."""
    return sorted(windows)[(len(windows) - 1) // 2]


def _timed(trainer, fn):
    """Run ``fn`` between barriers with the device synchronised; (its result, seconds here)."""
    s = trainer.strategy
    _sync(s.device)
    s.barrier()
    t0 = time.perf_counter()
    out = fn()
    _sync(s.device)
    s.barrier()
    return out, time.perf_counter() - t0


class _DataRunner:
    """Pulls micro-batches of successive epoch plans through the training input pipeline."""

    def __init__(self, trainer, first_epoch: int = 1_000_000):
        # Epochs training never reaches: a fresh order.
        self.trainer, self.epoch = trainer, first_epoch
        self.it = None
        self.left = 0
        self.last = None

    def run(self, micro_batches: int) -> int:
        """Global images in the next ``micro_batches`` micro-batches (all ranks together)."""
        images = 0
        for _ in range(micro_batches):
            if self.left == 0:
                plan = self.trainer.plan(self.epoch)
                self.epoch += 1
                pipe = self.trainer.parts.train_data
                pipe.set_epoch(plan)
                self.it, self.left, self.plan, self.m = iter(pipe), plan.num_micro_batches, plan, 0
            self.last = next(self.it)
            g = self.plan.global_micro_batch
            images += min(self.plan.n, (self.m + 1) * g) - self.m * g
            self.m += 1
            self.left -= 1
        return images


def run_train_steps(trainer, steps: int) -> int:
    """``steps`` optimizer steps through the real loop (`Trainer.train_one_epoch`, with its polls,
    logging and epoch ends), across epochs; global images used."""
    st = trainer.state
    trainer.step_limit = st.global_step + steps
    images = 0
    while st.global_step < trainer.step_limit:
        plan = trainer.plan(st.epoch)
        before = st.step_in_epoch
        trainer.train_one_epoch(st.epoch)
        images += sum(plan.step_samples(s) for s in range(before, st.step_in_epoch))
        if st.step_in_epoch >= plan.num_steps:
            st.next_epoch()
    return images


def build_trainer(cfg: Config):
    """A Trainer built exactly as `distrain train` builds it, whose outputs go nowhere."""
    from pathlib import Path

    from distrain.build import build, check_toolchain
    from distrain.data import cache
    from distrain.distributed import Strategy, resolve_runtime
    from distrain.metrics import MetricsLogger
    from distrain.progress import Progress
    from distrain.rundir import RunDir
    from distrain.train import dist_options
    from distrain.trainer import Trainer

    runtime = resolve_runtime(cfg.train.device, cfg.train.mixed_precision)
    strategy = Strategy(runtime, dist_options(cfg))
    check_toolchain(cfg, strategy)
    with cache.read_only():
        parts = build(cfg, strategy)
    metrics = MetricsLogger(Path(cfg.output_dir), enabled=False, tensorboard=False)
    run = RunDir(Path(cfg.output_dir), None, metrics, {}, record_traces=False)
    return Trainer(cfg, strategy, parts, run, Progress(enabled=False, mode="none"))


def _pipeline_rates(trainer, steps: int, warmup: int, repeats: int) -> list[float]:
    """Images/s of the training input pipeline alone, in ``repeats`` windows after a warm-up."""
    accum = trainer.cfg.train.grad_accum_steps
    data = _DataRunner(trainer)
    data.run(max(2, warmup * accum))
    window = max(steps * accum, 64)  # the pipeline alone is fast: long enough windows to time
    rates = []
    for _ in range(repeats):
        images, seconds = _timed(trainer, lambda: data.run(window))
        rates.append(images / max(seconds, 1e-9))
    data.last = None  # the last batch: free it before training
    return rates


def bench(cfg: Config, steps: int = 30, warmup: int = 5, repeats: int = 3) -> Optional[dict]:
    """Measure; the result dict on the main process, None on the others."""
    if steps < 1:
        raise UserError("--steps must be >= 1")
    if warmup < 0:
        raise UserError("--warmup must be >= 0")
    if repeats < 1:
        raise UserError("--repeats must be >= 1")
    trainer = build_trainer(cfg)
    st = trainer.state

    trainer.sanity_eval()
    run_train_steps(trainer, warmup)
    first, first_epoch = st.global_step + 1, st.epoch + 1
    windows = []  # (images/s, seconds)
    for _ in range(repeats):
        images, seconds = _timed(trainer, lambda: run_train_steps(trainer, steps))
        windows.append((images / max(seconds, 1e-9), seconds))
    train_rate, seconds = median_window(windows)
    epochs = f"epoch {first_epoch}" if st.epoch + 1 == first_epoch else \
        f"epochs {first_epoch}-{st.epoch + 1}"
    timed = (f"{repeats} window(s) of {steps} optimizer steps, {first}-{st.global_step} "
             f"({epochs}), median; after the sanity evaluation and {warmup} warm-up steps, "
             f"with every per-step check train makes")
    data_rates = _pipeline_rates(trainer, steps, warmup, repeats)
    trainer.strategy.close()

    if not trainer.strategy.is_main:
        return None
    dev = trainer.strategy.device
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        (_cpu_name() or platform.machine())
    fwd = forward_flops_per_image(cfg)
    achieved = fwd * 3 * train_rate / 1e12 if fwd else None
    peak = peak_bf16_tflops(device_name) if dev.type == "cuda" else None
    return {
        "model": cfg.model.name,
        "data": cfg.data.name,
        "train_samples": len(trainer.parts.train_split),
        "device": dev.type,
        "device_name": device_name,
        "precision": trainer.strategy.precision,
        "world_size": trainer.strategy.world,
        "batch_size": cfg.train.batch_size,
        "grad_accum_steps": cfg.train.grad_accum_steps,
        "global_batch": trainer.strategy.global_batch,
        "loader": trainer.parts.train_data.mode,
        "augment": bool(trainer.parts.train_data.augment),
        "channels_last": cfg.model.channels_last,
        "compile": cfg.model.compile,
        "warmup_steps": warmup,
        "steps": steps,
        "repeats": repeats,
        "data_img_per_s": statistics.median(data_rates),
        "train_img_per_s": train_rate,
        "train_windows_img_per_s": [round(r, 1) for r, _ in windows],
        "step_time_ms": 1000.0 * seconds / steps,
        "fwd_flops_per_image": fwd,
        "train_flops_per_image": fwd * 3 if fwd else None,
        "achieved_tflops": achieved,
        "peak_bf16_tflops": peak,
        "mfu": achieved / (peak * trainer.strategy.world) if achieved and peak else None,
        "timed": timed,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _cpu_name() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def format_result(r: dict) -> str:
    lines = [
        f"distrain bench: {r['model']} on {r['data']} ({r['train_samples']:,} images) | "
        f"{r['device']} ({r['device_name']}), precision {r['precision']}, world size "
        f"{r['world_size']} | global batch {r['global_batch']} ({r['batch_size']} x "
        f"{r['world_size']} x {r['grad_accum_steps']}) | {r['loader']} loader, augment "
        f"{'on' if r['augment'] else 'off'}, channels_last {r['channels_last']}, "
        f"compile {r['compile']}",
        f"  input pipeline  {r['data_img_per_s']:>12,.0f} img/s",
        f"  training step   {r['train_img_per_s']:>12,.0f} img/s  ({r['step_time_ms']:.2f} ms per "
        f"optimizer step, median of {r['repeats']} windows of {r['steps']} steps after "
        f"{r['warmup_steps']} warm-up)",
    ]
    if r["achieved_tflops"] is not None:
        if r["mfu"] is not None:
            mfu = (f"MFU {100 * r['mfu']:.1f}% of {r['peak_bf16_tflops']:.0f} TFLOP/s bf16 peak "
                   f"per GPU")
        else:
            mfu = "MFU n/a (no bf16 peak known for this device)"
        lines.append(f"  compute         {r['achieved_tflops']:>12.3f} TFLOP/s  "
                     f"({r['train_flops_per_image'] / 1e9:.3f} GFLOP per image fwd+bwd; {mfu})")
    return "\n".join(lines)


def run_bench(args) -> int:
    cfg = expand_paths(load_config(args.config, args.overrides))
    # Stray prints (libraries, compilers) must not reach stdout: --json owns it.
    with contextlib.redirect_stdout(sys.stderr):
        result = bench(cfg, steps=args.steps, warmup=args.warmup, repeats=args.repeats)
    if result is None:  # not the main process
        return 0
    if args.json:
        print(json.dumps(result))
    else:
        print(format_result(result), file=sys.stderr)
    return 0
