"""distrain against plain PyTorch, in one process, on the same machine, model and data.

1. Training step: distrain's real loop (`Trainer.train_one_epoch`, built as `distrain train` builds it,
   through Accelerate) against a bare PyTorch loop: the same model and initial weights, the same
   optimizer (distrain's SGD: momentum 0.9, nesterov, weight decay 5e-4, constant lr), the same batch
   size and batches in the same order, fp32, augmentation off on both; before each round the bare loop
   takes distrain's weights and optimizer state (CPU kernels run at weight-dependent speeds). The bare
   loop indexes a pre-normalised float32 copy of the split (the least work per step a loop can do), so
   distrain's gather + normalise counts against it.
2. Augmented input pipeline: distrain's device path (gather, crop + flip, normalise on the device,
   here the CPU) and its DataLoader path, against the seed tutorial's pipeline: a
   torchvision.datasets.CIFAR10-style dataset (one PIL image per item) with
   ``transforms.Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor(), Normalize])``
   through a shuffling DataLoader, with 0 workers and with as many workers as cores (the better
   one is the reference).

Every contestant warms up, then contestants take turns timing windows (rotating the order, a short
pause in between) so drift and other load on the machine hit them alike; each reports its median
window, and a ratio is the median over rounds of the ratio of back-to-back windows. Rates per
CPU-second of the process are reported too (steadier on a shared machine; not for DataLoader workers,
whose CPU time is another process's). The thread count is set once for the process (``--threads``)
and holds for all. Data: distrain's synthetic CIFAR-10
stand-in (CIFAR-10's shapes), or real CIFAR-10 with ``--data cifar10 --root DIR``.

    .venv/bin/python benchmarks/compare.py                 # table on stdout
    .venv/bin/python benchmarks/compare.py --json          # one JSON object
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TARGET_STEP_RATIO = 0.97
TARGET_PIPELINE_RATIO = 10.0


def machine() -> dict:
    from distrain.bench import _cpu_name

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": _cpu_name() or platform.processor(), "cores": cores, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


# ------------------------------------------------------------------------------------------------
# Contestants: each is a callable running one timed window and returning the images it processed.


class DistrainStep:
    name = "distrain train step (Trainer.train_one_epoch)"

    def __init__(self, overrides: list[str], steps: int):
        from distrain.bench import build_trainer
        from distrain.config import load_config

        self.tmp = tempfile.TemporaryDirectory(prefix="distrain-compare-")  # output_dir; nothing is written
        self.cfg = load_config(None, [*overrides, f"output_dir={self.tmp.name}/run"])
        self.trainer = build_trainer(self.cfg)
        self.steps = steps

    def __call__(self) -> int:
        from distrain.bench import run_train_steps

        return run_train_steps(self.trainer, self.steps)


class BareStep:
    """The loop every PyTorch tutorial writes, on a pre-normalised float32 copy of the split in memory.

    Same model and initial weights, same optimizer (built by distrain.optim: the same parameter groups and
    hyper-parameters), same batches in the same order (the epoch permutation of (seed, epoch)), and before
    every round it takes distrain's weights and optimizer state: on a CPU the kernels' speed depends on the
    weights (with lr 0.01 instead of 0.05 this very loop runs ~20% slower), and two runs drift apart
    through float rounding.
    """

    name = "bare PyTorch loop"

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, cfg, steps: int):
        from distrain.seeding import seed_everything
        from distrain.models import build_model
        from distrain.optim import build_optimizer

        seed_everything(cfg.train.seed)  # the same initial weights as distrain's (it seeds the same way)
        self.model = build_model(cfg.model.name, num_classes=cfg.model.num_classes).train()
        self.opt = build_optimizer(self.model, cfg.train, cfg.model, "cpu")
        m = torch.tensor(mean).view(1, 3, 1, 1)
        s = torch.tensor(std).view(1, 3, 1, 1)
        self.x = (images.float() / 255 - m) / s
        self.y = labels
        self.batch, self.steps, self.seed = cfg.train.batch_size, steps, cfg.train.seed
        self.epoch, self.pos = 0, 0
        self.perm = self._perm()

    def sync_from(self, trainer) -> None:
        """Take distrain's weights and optimizer state (both loops are at the same batch of the same epoch)."""
        from distrain.distributed import unwrap

        self.model.load_state_dict(unwrap(trainer.model).state_dict())
        self.opt.load_state_dict(trainer.parts.optimizer.optimizer.state_dict())
        assert (self.epoch, self.pos) == (trainer.state.epoch, trainer.state.step_in_epoch * self.batch), \
            "the two loops are not at the same batch"

    def _perm(self) -> torch.Tensor:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.y), generator=g)

    def __call__(self) -> int:
        n = 0
        for _ in range(self.steps):
            idx = self.perm[self.pos : self.pos + self.batch]
            self.pos += self.batch
            if self.pos >= len(self.perm):  # the epoch's last (possibly short) batch: next epoch's order
                self.epoch, self.pos = self.epoch + 1, 0
                self.perm = self._perm()
            x, y = self.x[idx], self.y[idx]
            loss = F.cross_entropy(self.model(x), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            n += len(y)
        loss.item()
        return n


class DistrainPipeline:
    def __init__(self, images, labels, classes, loader: str, batch: int, batches: int, seed: int):
        from distrain.config import load_config
        from distrain.data.pipeline import InputPipeline, Split
        from distrain.build import pipeline_spec

        self.name = f"distrain {loader} path (crop+flip+normalise)"
        cfg = load_config(None, [f"data.loader={loader}", "data.augment=true", f"train.batch_size={batch}",
                                 f"train.seed={seed}", "data.num_workers=0"])
        split = Split(labels, list(classes), images=images, source="compare")
        self.pipe = InputPipeline(split, pipeline_spec(cfg, batch), torch.device("cpu"), 0, 1, train=True)
        self.cfg, self.batches, self.epoch, self.it = cfg, batches, 0, iter(())

    def _next(self):
        from distrain.data.sampling import EpochPlan

        try:
            return next(self.it)
        except StopIteration:
            t = self.cfg.train
            self.pipe.set_epoch(EpochPlan(len(self.pipe.split), t.batch_size, 1, 0, 1, t.seed, self.epoch))
            self.epoch += 1
            self.it = iter(self.pipe)
            return next(self.it)

    def __call__(self) -> int:
        return sum(len(self._next()[1]) for _ in range(self.batches))


class SeedCIFAR(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per item: an HWC uint8 array row -> PIL image -> transform."""

    def __init__(self, images_nchw: torch.Tensor, labels: torch.Tensor, transform):
        self.data = np.ascontiguousarray(images_nchw.numpy().transpose(0, 2, 3, 1))  # like CIFAR10.data
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        from PIL import Image

        img, target = self.data[index], self.targets[index]
        return self.transform(Image.fromarray(img)), target


class SeedPipeline:
    def __init__(self, images, labels, mean, std, batch: int, batches: int, workers: int, seed: int):
        import torchvision.transforms as T

        self.name = f"seed PIL pipeline, DataLoader workers={workers}"
        transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
        ds = SeedCIFAR(images, labels, transform)
        self.loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                                  persistent_workers=workers > 0,
                                                  generator=torch.Generator().manual_seed(seed))
        self.batches, self.it = batches, iter(())

    def _next(self):
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)

    def __call__(self) -> int:
        return sum(len(self._next()[1]) for _ in range(self.batches))


def race(contestants: list, repeats: int, warmup: int, pause: float = 0.3, before_round=None) -> list[dict]:
    """Warm each up, then time ``repeats`` windows per contestant, taking turns in rotating order.

    ``pause`` seconds between windows let DataLoader workers finish their prefetching, which would
    otherwise run into the next contestant's window. ``before_round()`` runs (untimed) before each round.
    """
    for c in contestants:
        for _ in range(warmup):
            c()
    rates: list[list[float]] = [[] for _ in contestants]
    cpu_rates: list[list[float]] = [[] for _ in contestants]
    for r in range(repeats):
        if before_round is not None:
            before_round()
        order = list(range(len(contestants)))
        order = order[r % len(order):] + order[: r % len(order)]
        for i in order:
            time.sleep(pause)
            t0, c0 = time.perf_counter(), time.process_time()
            n = contestants[i]()
            rates[i].append(n / (time.perf_counter() - t0))
            cpu_rates[i].append(n / max(time.process_time() - c0, 1e-9))
    # cpu_img_per_s: per second of this process's CPU time (all its threads, not DataLoader workers): steadier
    # than wall time on a shared machine, meaningful for contestants that do all their work in-process.
    return [{"name": c.name, "img_per_s": statistics.median(rs), "min": min(rs), "max": max(rs), "windows": len(rs),
             "cpu_img_per_s": statistics.median(cs), "rates": rs, "cpu_rates": cs}
            for c, rs, cs in zip(contestants, rates, cpu_rates)]


def paired_ratio(ours: dict, refs: list[dict], key: str = "rates") -> float:
    """Median over rounds of ours / the best reference in the same round (windows timed back to back, so a
    change of load on the machine between rounds cancels out)."""
    return statistics.median(o / max(r[key][i] for r in refs) for i, o in enumerate(ours[key]))


def load_data(args):
    if args.data == "cifar10":
        from distrain.data import cifar10

        images, labels, classes = cifar10.load_cifar10(args.root, train=True, verify=False, max_samples=args.samples)
        mean, std = cifar10.MEAN, cifar10.STD
        overrides = ["data.name=cifar10", f"data.root={args.root}", "data.verify=false"]
    else:
        from distrain.data import synthetic

        images, labels, classes = synthetic.make_synthetic(train=True, seed=args.seed, max_samples=args.samples)
        mean, std = synthetic.MEAN, synthetic.STD
        overrides = ["data.name=synthetic"]
    return torch.from_numpy(images), torch.from_numpy(labels), classes, mean, std, overrides


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=["synthetic", "cifar10"], default="synthetic")
    p.add_argument("--root", default="data", help="CIFAR-10 root with --data cifar10")
    p.add_argument("--samples", type=int, default=50_000, help="training images used (default: the whole split)")
    p.add_argument("--model", default="cifar10_quick")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch threads for everything (default: torch's)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per timed window")
    p.add_argument("--batches", type=int, default=40, help="pipeline batches per timed window")
    p.add_argument("--repeats", type=int, default=7, help="timed windows per contestant (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed windows per contestant first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate of both loops (distrain's default)")
    p.add_argument("--skip", choices=["step", "pipeline"], action="append", default=[])
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images, labels, classes, mean, std, data_over = load_data(args)
    result = {"machine": machine(), "data": args.data, "samples": len(labels), "batch_size": args.batch_size,
              "model": args.model, "repeats": args.repeats, "command": " ".join([sys.executable, *sys.argv])}

    if "step" not in args.skip:
        # scheduler none: a constant lr like the bare loop's (distrain still builds and steps its LambdaLR).
        over = [*data_over, f"data.max_train_samples={args.samples}", "data.max_test_samples=100",
                "data.augment=false", "data.loader=device", f"model.name={args.model}",
                f"train.batch_size={args.batch_size}", "train.mixed_precision=no", "train.device=cpu",
                "train.optimizer=sgd", f"train.lr={args.lr}", "train.scheduler=none", f"train.seed={args.seed}",
                "train.epochs=1000"]
        ours_loop = DistrainStep(over, args.steps)
        bare_loop = BareStep(images, labels, mean, std, ours_loop.cfg, args.steps)
        # Each round starts both loops from the same weights and optimizer state at the same batch: on a
        # CPU the kernels' speed depends on the weights, and two runs drift apart through float rounding.
        bare, ours = race([bare_loop, ours_loop], args.repeats, args.warmup,
                          before_round=lambda: bare_loop.sync_from(ours_loop.trainer))
        del bare_loop, ours_loop
        result["step"] = {"bare": bare, "distrain": ours, "ratio": paired_ratio(ours, [bare]),
                          "ratio_cpu_time": paired_ratio(ours, [bare], "cpu_rates"),
                          "ratio_of_medians": ours["img_per_s"] / bare["img_per_s"], "target": TARGET_STEP_RATIO}

    if "pipeline" not in args.skip:
        cores = result["machine"]["cores"] or 1
        contestants = [SeedPipeline(images, labels, mean, std, args.batch_size, args.batches, 0, args.seed),
                       SeedPipeline(images, labels, mean, std, args.batch_size, args.batches, cores, args.seed),
                       DistrainPipeline(images, labels, classes, "device", args.batch_size, args.batches, args.seed),
                       DistrainPipeline(images, labels, classes, "dataloader", args.batch_size, args.batches, args.seed)]
        seed0, seedw, dev, dl = race(contestants, args.repeats, args.warmup)
        ref = max(seed0, seedw, key=lambda r: r["img_per_s"])
        result["pipeline"] = {"seed_workers0": seed0, f"seed_workers{cores}": seedw, "distrain_device": dev,
                              "distrain_dataloader": dl, "reference": ref["name"],
                              "ratio": paired_ratio(dev, [seed0, seedw]),
                              "ratio_dataloader": paired_ratio(dl, [seed0, seedw]),
                              "ratio_of_medians": dev["img_per_s"] / ref["img_per_s"], "target": TARGET_PIPELINE_RATIO}
        del contestants
    result["machine"]["load_avg_1min_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None

    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
    return 0


def format_table(r: dict) -> str:
    m = r["machine"]
    out = [f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, torch {m['torch']}, "
           f"Python {m['python']} (load average {m['load_avg_1min']} -> {m['load_avg_1min_end']})",
           f"data: {r['data']}, {r['samples']:,} training images, batch {r['batch_size']}; {r['repeats']} rounds of "
           f"back-to-back windows: median img/s [min..max], ratio = median of the per-round ratios", ""]
    w = 52

    def row(res, ratio=None, target=None):
        rt = ""
        if ratio is not None:
            rt = f"{ratio:8.3f}x  (target >= {target:g}: {'met' if ratio >= target else 'NOT met'})"
        return f"  {res['name']:<{w}} {res['img_per_s']:>10,.0f}  [{res['min']:,.0f}..{res['max']:,.0f}]  {rt}"

    if "step" in r:
        s = r["step"]
        out += [f"training step: {r['model']}, fp32 SGD, augmentation off          img/s", row(s["bare"]),
                row(s["distrain"], s["ratio"], s["target"]),
                f"  (per CPU-second of the process: bare {s['bare']['cpu_img_per_s']:,.0f}, distrain "
                f"{s['distrain']['cpu_img_per_s']:,.0f} img/s, ratio {s['ratio_cpu_time']:.3f})", ""]
    if "pipeline" in r:
        pl = r["pipeline"]
        out += ["input pipeline: crop(pad 4) + flip + normalise                    img/s"]
        for k, v in pl.items():
            if k.startswith("seed_"):
                out.append(row(v))
        out.append(row(pl["distrain_device"], pl["ratio"], pl["target"]))
        out.append(row(pl["distrain_dataloader"], pl["ratio_dataloader"], pl["target"]))
        out.append("  (ratios: median over rounds of distrain / the better seed pipeline of the same round)")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
