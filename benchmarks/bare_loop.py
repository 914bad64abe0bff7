"""The bare PyTorch training loop on any device: the reference distrain's step is measured against.

The least work a loop can do per step: a pre-normalised float copy of the images already on the
device, ``x[idx]``, ``model(x)`` under autocast, ``loss.backward()``, ``opt.step()`` (distrain's own
optimizer from `distrain.optim.build_optimizer`: fused SGD, the same parameter groups), nothing else.
The model, precision, memory format, batch size and ``torch.compile`` are distrain's choices for the
same config, so ``distrain bench``'s ``train_img_per_s`` over this loop's ``img_per_s`` is the cost
of everything distrain adds (input pipeline, loss bookkeeping, Accelerate, schedule).

    python benchmarks/bare_loop.py --json --device cuda --batch-size 2048 --precision bf16 --channels-last
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def device_images(samples: int, input_size: int, device: torch.device, seed: int):
    """Normalised synthetic CIFAR-shaped images and labels on ``device`` (resized once if needed)."""
    from distrain.data import synthetic

    images, labels, _ = synthetic.make_synthetic(train=True, seed=seed, max_samples=samples)
    x = torch.from_numpy(images).to(device).float().div_(255)
    mean = torch.tensor(synthetic.MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(synthetic.STD, device=device).view(1, 3, 1, 1)
    x = (x - mean) / std
    if input_size != x.shape[-1]:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
    return x, torch.from_numpy(labels).long().to(device)


def build(args, device: torch.device):
    from distrain.config import load_config
    from distrain.models import build_model
    from distrain.optim import build_optimizer

    cfg = load_config(None, [f"model.name={args.model}", "train.optimizer=sgd", f"train.lr={args.lr}"])
    torch.manual_seed(args.seed)
    model = build_model(args.model, num_classes=10).to(device).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg.train, cfg.model, device.type)
    return (torch.compile(model) if args.compile else model), opt


def measure(args) -> dict:
    from distrain.bench import median_window

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as distrain sets it on CUDA
    x_all, y_all = device_images(args.samples, args.input_size, device, args.seed)
    if args.channels_last:
        x_all = x_all.contiguous(memory_format=torch.channels_last)
    model, opt = build(args, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
    n, b = len(y_all), args.batch_size
    perm = torch.randperm(n, device=device, generator=None)
    pos = 0

    def step():
        nonlocal pos, perm
        if pos + b > n:
            perm, pos = torch.randperm(n, device=device), 0
        idx = perm[pos:pos + b]
        pos += b
        ctx = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with ctx:
            out = model(x_all[idx])
        loss = F.cross_entropy(out.float(), y_all[idx])
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return loss

    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    windows = []  # (images/s, seconds); as `distrain bench` times its training step
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        sync()
        seconds = time.perf_counter() - t0
        windows.append((args.steps * b / seconds, seconds))
    rate, seconds = median_window(windows)
    return {"name": "bare PyTorch loop", "model": args.model, "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "batch_size": b, "input_size": args.input_size, "precision": args.precision,
            "channels_last": args.channels_last, "compile": args.compile, "steps": args.steps,
            "warmup_steps": args.warmup, "repeats": args.repeats, "img_per_s": rate,
            "windows_img_per_s": [round(r, 1) for r, _ in windows],
            "step_time_ms": 1000 * seconds / args.steps, "final_loss": float(loss.detach()),
            "torch": torch.__version__}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cifar10_quick")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], default="bf16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--samples", type=int, default=50_000, help="images kept on the device")
    p.add_argument("--steps", type=int, default=100, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=1, help="timed windows; img_per_s is their median")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    r = measure(args)
    print(json.dumps(r) if args.json else f"{r['name']}: {r['img_per_s']:,.0f} img/s, "
          f"{r['step_time_ms']:.2f} ms per step ({r['model']}, batch {r['batch_size']}, {r['device']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
