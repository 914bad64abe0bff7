"""Checkpoint save / verify / load time and on-disk size, for VGG16 and CIFAR10-quick (not a test).

Drives the same code the trainer runs (`CheckpointStore.save`, `.newest_good`, `resume.restore`) on a real
Accelerate-prepared model and SGD optimizer with momentum buffers, without training: the numbers are
those of `checkpoint.every_steps` saves and of a `resume=auto` start, one process.

- save: everything `save` does on one process: state dicts to safetensors bytes, SHA-256 of every
  file, writes with fsync, rename (commit), pointer, retention.
- verify: what `resume=auto` checks before trusting a checkpoint: state.json digest, then size, SHA-256
  and header of every file.
- load: reading the files and restoring model, optimizer, scheduler, progress and RNG.
Files are read from the page cache (just written); a cold read adds disk time.

    .venv/bin/python benchmarks/checkpoint_bench.py                      # both models, table on stdout
    .venv/bin/python benchmarks/checkpoint_bench.py --models cifar10_quick --repeat 5 --json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distrain import ckpt_format as fmt  # noqa: E402
from distrain import resume  # noqa: E402
from distrain.checkpoint import CheckpointStore, Snapshot, rank_payload  # noqa: E402
from distrain.config import Config  # noqa: E402
from distrain.distributed import DistOptions, Strategy, resolve_runtime, unwrap  # noqa: E402
from distrain.models import build_model  # noqa: E402
from distrain.optim import build_optimizer, build_scheduler  # noqa: E402
from distrain.state import TrainState  # noqa: E402


def setup(model_name: str):
    """A real Accelerate-prepared model and SGD optimizer with a momentum buffer per parameter."""
    cfg = Config()
    cfg.model.name, cfg.data.name, cfg.train.device, cfg.train.mixed_precision = \
        model_name, "synthetic", "cpu", "no"
    strategy = Strategy(resolve_runtime("cpu", "no"), DistOptions(batch_size=cfg.train.batch_size))
    model = build_model(model_name, num_classes=10)
    optimizer = build_optimizer(model, cfg.train, cfg.model, "cpu")
    for group in optimizer.param_groups:  # as after a step: one momentum buffer per parameter
        for p in group["params"]:
            optimizer.state[p]["momentum_buffer"] = torch.randn_like(p)
    scheduler = build_scheduler(optimizer, cfg.train, 390, 390 * cfg.train.epochs)
    model, optimizer = strategy.prepare(model, optimizer)
    return cfg, strategy, model, optimizer, scheduler


def bench(model_name: str, repeat: int, root: Path) -> dict:
    run_dir = root / model_name
    cfg, s, model, optimizer, scheduler = setup(model_name)
    state = TrainState(epoch=3, step_in_epoch=100, global_step=1270, epoch_samples=12800)
    info = {"architecture": model_name, "num_classes": 10}
    store = CheckpointStore(run_dir / "checkpoints", keep_last=1, log=lambda m: print(m, file=sys.stderr))

    def snapshot() -> Snapshot:
        return Snapshot(state, s.model_state_dict(model), s.optimizer_state(optimizer),
                        scheduler.state_dict(), s.scaler_state(), cfg.to_dict(), info, 1,
                        s.global_batch, 390 * s.global_batch)

    targets = resume.Targets(unwrap(model), optimizer, scheduler, s, cfg, None, 390 * s.global_batch)
    save_s, verify_s, load_s = [], [], []
    for _ in range(repeat):
        state.global_step += 1
        t0 = time.perf_counter()
        store.save(s, lambda: rank_payload(state, None), snapshot, reason="bench")
        save_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        found = store.newest_good(lambda meta, path: None)
        verify_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        loaded, _ = resume.restore(found, targets, store.log)
        load_s.append(time.perf_counter() - t0)
        assert loaded.global_step == state.global_step
    d = fmt.list_checkpoints(run_dir / "checkpoints")[-1]
    files = {p.name: p.stat().st_size for p in sorted(d.iterdir())}
    shutil.rmtree(run_dir, ignore_errors=True)
    params = sum(p.numel() for p in unwrap(model).parameters())
    return {"model": model_name, "parameters": params, "repeat": repeat,
            "save_s": statistics.median(save_s), "verify_s": statistics.median(verify_s),
            "load_s": statistics.median(load_s), "size_mb": sum(files.values()) / 2**20,
            "files_mb": {k: round(v / 2**20, 3) for k, v in files.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["cifar10_quick", "vgg16"])
    ap.add_argument("--repeat", type=int, default=3, help="saves and loads per model (the median is reported)")
    ap.add_argument("--dir", help="where to write (default: a temporary directory on /tmp)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        results = [bench(m, args.repeat, root) for m in args.models]
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}))
        return 0
    print(f"{'model':<15}{'parameters':>13}{'size MB':>10}{'save s':>9}{'verify s':>10}{'load s':>9}   (median of {args.repeat})")
    for r in results:
        print(f"{r['model']:<15}{r['parameters']:>13,}{r['size_mb']:>10.1f}{r['save_s']:>9.3f}{r['verify_s']:>10.3f}{r['load_s']:>9.3f}")
    for r in results:
        print(f"  {r['model']}: " + ", ".join(f"{k} {v} MB" for k, v in r["files_mb"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
