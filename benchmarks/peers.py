"""distrain against its peers on one recipe, interleaved: images/s per epoch, CPU time, memory.

Contestants, each a separate process tree started fresh for every run:

- ``distrain``: ``distrain train`` (``accelerate launch --multi_gpu`` for 2 processes), as a user
  runs it.
- ``accelerate``: a plain Accelerate script in the style of accelerate's ``complete_cv_example``:
  ``Accelerator(cpu=True)``, torchvision's CIFAR10 dataset with transforms, a DataLoader,
  ``prepare``, ``accelerator.backward``, ``gather_for_metrics`` in the evaluation (same launcher as
  distrain).
- ``lightning``: a LightningModule and ``Trainer(accelerator="cpu", devices=N, strategy="ddp")``
  (its own launcher), logger, checkpointing, progress bar and model summary off.
- ``bench``: ``distrain bench --json`` on the same config (not a peer: the check that bench times
  what train runs; its one rate sits in the epoch columns, to be read against distrain's steady
  epochs).
- ``seed``: the seed tutorial's loop (torchvision dataset + DataLoader, ``zero_grad / forward / loss
  / backward / step``); one process only, as the tutorial is.

The recipe is the same for all: the CIFAR10-quick network (distrain's module, so the FLOPs are
equal), fp32, batch ``--batch-size`` per process, SGD (lr 0.01, momentum 0.9, Nesterov, weight decay
5e-4) with a per-step cosine schedule, random crop (pad 4) + flip + normalise, an evaluation of the
test split after every epoch, on a fake CIFAR-10 of the real files' format and shapes written once
for the run. Each process gets ``OMP_NUM_THREADS = cores / processes`` (``--threads``); the peers'
DataLoaders use ``--workers`` workers.

Per epoch, a contestant's main process times its training part (from the epoch's first batch request
to the end of its last step; evaluation and checkpoints excluded): images/s = training images /
seconds. distrain's times come from its metrics.jsonl (from ``start``, or the previous epoch's last
event, to the epoch's ``train`` event). Per run: wall time, the tree's user and system CPU seconds
and minor page faults (``wait4``: steadier than wall time on a loaded machine), and memory polled
every 0.25 s: the sum over the tree's processes of their peak RSS (VmHWM; forked DataLoader workers
count pages they share with their parent) and the peak of the tree's summed PSS.

``--malloc off,on``: ``on`` is distrain's start-up allocator setting (distrain/allocator.py) for
distrain and the same settings as ``MALLOC_*`` environment variables for the peers (the fair
column); ``off`` is glibc's defaults for all (``DISTRAIN_MALLOC=0`` for distrain). Runs of one
(processes, malloc) group are interleaved, the order rotated every round; the table shows the median
over rounds and the spread.

    .venv/bin/python benchmarks/peers.py --rounds 3 --json peers.json      # the full recipe
    .venv/bin/python benchmarks/peers.py --train-samples 256 --test-samples 64 --epochs 1 \
        --max-steps 1                                                  # a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONTESTANTS = ("distrain", "bench", "accelerate", "lightning", "seed")
# `distrain bench` on the same recipe: 3 timed windows of BENCH_STEPS (their median) after warm-up.
BENCH_STEPS, BENCH_WARMUP = 150, 10
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4


# ------------------------------------------------------------------------------------------------
# The peers (run in their own processes: `peers.py --peer NAME ...`)


def _cifar(root: str, train: bool):
    """torchvision's CIFAR10 with its train/test transforms; md5 checks skipped (fake files)."""
    import torchvision.transforms as T
    from torchvision.datasets import CIFAR10, cifar

    from distrain.data.cifar10 import MEAN, STD

    cifar.check_integrity = lambda *args, **kw: True
    aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
    transform = T.Compose([*aug, T.ToTensor(), T.Normalize(MEAN, STD)])
    return CIFAR10(root, train=train, download=False, transform=transform)


def _loaders(a):
    import torch

    train, test = _cifar(a.root, True), _cifar(a.root, False)
    kw = {"num_workers": a.workers, "persistent_workers": a.workers > 0}
    return (torch.utils.data.DataLoader(train, batch_size=a.batch_size, shuffle=True, **kw),
            torch.utils.data.DataLoader(test, batch_size=256, **kw))


def _model_and_optimizer(total_steps: int):
    import torch

    from distrain.models import build_model

    torch.manual_seed(0)
    model = build_model("cifar10_quick", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True,
                          weight_decay=WEIGHT_DECAY)
    return model, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))


def _steps(a, batches_per_epoch: int) -> int:
    per_epoch = batches_per_epoch if a.max_steps is None else min(batches_per_epoch, a.max_steps)
    return per_epoch * a.epochs


def _write_result(a, epochs: list, accuracy: float) -> None:
    Path(a.out).write_text(json.dumps({"epochs": epochs, "accuracy": accuracy}))


def peer_seed(a) -> None:
    """The seed tutorial's loop, one process."""
    import torch
    import torch.nn.functional as F

    train_dl, test_dl = _loaders(a)
    model, opt, sched = _model_and_optimizer(_steps(a, len(train_dl)))
    epochs, acc = [], 0.0
    for epoch in range(a.epochs):
        model.train()
        t0, n = time.perf_counter(), 0
        for i, (x, y) in enumerate(train_dl):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            n += len(y)
            if a.max_steps is not None and i + 1 >= a.max_steps:
                break
        loss.item()
        epochs.append({"epoch": epoch, "images": n, "seconds": time.perf_counter() - t0})
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in test_dl:
                correct += (model(x).argmax(1) == y).sum().item()
                total += len(y)
        acc = correct / max(total, 1)
    _write_result(a, epochs, acc)


def peer_accelerate(a) -> None:
    """accelerate's complete_cv_example, reduced to the recipe."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    train_dl, test_dl = _loaders(a)
    # As in the example: the schedule is sized before `prepare`; Accelerate steps it per process.
    model, opt, sched = _model_and_optimizer(_steps(a, len(train_dl)))
    model, opt, train_dl, test_dl, sched = accelerator.prepare(model, opt, train_dl, test_dl, sched)
    epochs, acc = [], 0.0
    for epoch in range(a.epochs):
        model.train()
        t0, n = time.perf_counter(), 0
        for i, (x, y) in enumerate(train_dl):
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            n += len(y) * accelerator.num_processes
            if a.max_steps is not None and i + 1 >= a.max_steps:
                break
        loss.item()
        epochs.append({"epoch": epoch, "images": n, "seconds": time.perf_counter() - t0})
        model.eval()
        correct = total = 0
        for x, y in test_dl:
            with torch.no_grad():
                pred = model(x).argmax(1)
            pred, y = accelerator.gather_for_metrics((pred, y))
            correct += (pred == y).sum().item()
            total += len(y)
        acc = correct / max(total, 1)
    if accelerator.is_main_process:
        _write_result(a, epochs, acc)
    accelerator.end_training()


def peer_lightning(a) -> None:
    """A LightningModule and Trainer; Lightning launches its own DDP processes."""
    import lightning as L
    import torch
    import torch.nn.functional as F

    class Module(L.LightningModule):
        def __init__(self, steps: int):
            super().__init__()
            self.steps = steps
            self.net, self.opt, self.sched = _model_and_optimizer(steps)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, i):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, i):
            x, y = batch
            self.log("val_acc", (self(x).argmax(1) == y).float().mean(), sync_dist=True)

        def configure_optimizers(self):
            sched = {"scheduler": self.sched, "interval": "step"}
            return {"optimizer": self.opt, "lr_scheduler": sched}

    timer = _LightningEpochTimer(L)
    train_dl, test_dl = _loaders(a)
    steps = _steps(a, math.ceil(len(train_dl) / a.procs))
    strategy = "ddp" if a.procs > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=a.procs, strategy=strategy,
                        max_epochs=a.epochs, limit_train_batches=a.max_steps, precision="32-true",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer])
    trainer.fit(Module(steps), train_dl, test_dl)
    if trainer.is_global_zero:
        acc = trainer.callback_metrics.get("val_acc", torch.tensor(0.0))
        _write_result(a, timer.epochs, float(acc))


def _LightningEpochTimer(L):
    class EpochTimer(L.Callback):
        """The training part of every epoch: from its start to its validation (or its end)."""

        def __init__(self):
            self.epochs, self.t0, self.n = [], None, 0

        def on_train_epoch_start(self, trainer, module):
            self.t0, self.n = time.perf_counter(), 0

        def on_train_batch_end(self, trainer, module, outputs, batch, i):
            self.n += len(batch[1]) * trainer.world_size

        def _close(self, trainer):
            if self.t0 is not None and not trainer.sanity_checking:
                self.epochs.append({"epoch": trainer.current_epoch, "images": self.n,
                                    "seconds": time.perf_counter() - self.t0})
                self.t0 = None

        def on_validation_epoch_start(self, trainer, module):
            self._close(trainer)

        def on_train_epoch_end(self, trainer, module):
            self._close(trainer)

    return EpochTimer()


PEERS = {"seed": peer_seed, "accelerate": peer_accelerate, "lightning": peer_lightning}


# ------------------------------------------------------------------------------------------------
# The runner


def _launch(nprocs: int, port: int, target: list[str]) -> list[str]:
    """``accelerate launch`` for 2+ processes (as in distrain's tests), else plain python."""
    if nprocs == 1:
        return [sys.executable, *target]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(nprocs), "--num_machines", "1", "--main_process_port", str(port),
            "--mixed_precision", "no",
            "--dynamo_backend", "no", *target]


def command(name: str, nprocs: int, a, root: Path, work: Path, port: int) -> list[str]:
    if name in ("distrain", "bench"):
        over = {"output_dir": work / "run", "data.name": "cifar10", "data.root": root,
                "data.verify": "false", "data.download": "false", "train.epochs": a.epochs,
                "train.batch_size": a.batch_size,
                "train.mixed_precision": "no", "train.device": "cpu", "log.tensorboard": "false",
                "log.progress": "none"}
        if a.max_steps is not None and a.epochs == 1:  # the whole split is held, as by the peers
            over["train.max_steps"] = a.max_steps
        elif a.max_steps is not None:  # no per-epoch step limit in distrain: fewer images
            over["data.max_train_samples"] = a.max_steps * a.batch_size * nprocs
        args = [f"{k}={v}" for k, v in over.items()]
        if name == "bench":  # the same config, timed by `distrain bench`
            steps = [str(min(BENCH_STEPS, a.max_steps or BENCH_STEPS)), str(BENCH_WARMUP)]
            if a.max_steps is not None:
                steps[1] = "1"
            return _launch(nprocs, port, ["-m", "distrain", "bench", "--json", "--steps", steps[0],
                                          "--warmup", steps[1], *args])
        return _launch(nprocs, port, ["-m", "distrain", "train", *args])
    peer = [str(Path(__file__).resolve()), "--peer", name, "--root", str(root),
            "--out", str(work / "result.json"), "--epochs", str(a.epochs),
            "--batch-size", str(a.batch_size), "--workers", str(a.workers), "--procs", str(nprocs)]
    if a.max_steps is not None:
        peer += ["--max-steps", str(a.max_steps)]
    if name == "lightning":  # its own launcher
        return [sys.executable, *peer]
    return _launch(nprocs, port, peer)


def environment(name: str, nprocs: int, malloc: str, threads: int) -> dict:
    from distrain.allocator import ENV_EQUIVALENT, OPT_OUT_VAR

    drop = (OPT_OUT_VAR, "GLIBC_TUNABLES", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
            "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in drop}
    threads = str(threads)
    env.update({"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                "PYTHONUNBUFFERED": "1"})
    ours = name in ("distrain", "bench")
    if malloc == "off" and ours:
        env[OPT_OUT_VAR] = "0"
    elif malloc == "on" and not ours:
        env.update(ENV_EQUIVALENT)
    return env


class TreeMemory(threading.Thread):
    """Polls a process tree: each process's peak RSS (VmHWM), the peak of the tree's summed PSS."""

    def __init__(self, pid: int, every: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.every, self.hwm, self.pss_peak = pid, every, {}, 0
        self.done = threading.Event()

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(d))
        tree, todo = [], [self.pid]
        while todo:
            p = todo.pop()
            tree.append(p)
            todo += children.get(p, [])
        return tree

    @staticmethod
    def _kib(pid: int, path: str, key: str) -> int:
        try:
            for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
                if line.startswith(key):
                    return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return 0

    def run(self) -> None:
        while not self.done.is_set():
            pss = 0
            for p in self._tree():
                self.hwm[p] = max(self.hwm.get(p, 0), self._kib(p, "status", "VmHWM:"))
                pss += self._kib(p, "smaps_rollup", "Pss:")
            self.pss_peak = max(self.pss_peak, pss)
            self.done.wait(self.every)


def run_one(name: str, nprocs: int, malloc: str, a, root: Path, cores: int) -> dict:
    from conftest import free_port  # tests/conftest.py: one owner for a free port

    with tempfile.TemporaryDirectory(prefix=f"peers-{name}-") as tmp:
        work = Path(tmp)
        cmd = command(name, nprocs, a, root, work, free_port())
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        log = open(work / "output.txt", "w")
        out = open(work / "stdout.txt", "w") if name == "bench" else log  # bench's JSON alone
        env = environment(name, nprocs, malloc, a.threads or max(1, cores // nprocs))
        # Its own process group: an interrupted benchmark takes the whole tree down with it.
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=log, cwd=work,
                                start_new_session=True)
        mem = TreeMemory(proc.pid)
        mem.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            mem.done.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # leftovers (DataLoader workers) of a run
            log.close()
            out.close()
        wall = time.perf_counter() - t0
        mem.join()
        rec = {"contestant": name, "procs": nprocs, "malloc": malloc, "load_1min": round(load, 2),
               "wall_s": round(wall, 2), "user_s": round(usage.ru_utime, 2),
               "sys_s": round(usage.ru_stime, 2), "minor_faults": usage.ru_minflt,
               "sum_peak_rss_mib": round(sum(mem.hwm.values()) / 1024), "processes": len(mem.hwm),
               "peak_pss_mib": round(mem.pss_peak / 1024),
               "exit": os.waitstatus_to_exitcode(status)}
        if rec["exit"] != 0:
            tail = (work / "output.txt").read_text()[-3000:]
            raise RuntimeError(f"{name} ({nprocs} processes) exited {rec['exit']}:\n{tail}")
        if name == "bench":
            bench = json.loads((work / "stdout.txt").read_text())
            rec["epoch_img_per_s"] = [round(bench["train_img_per_s"], 1)]
            rec["timed"] = bench["timed"]
            rec["windows"] = bench["train_windows_img_per_s"]
            return rec
        epochs = distrain_epochs(work / "run" / "metrics.jsonl") if name == "distrain" else \
            json.loads((work / "result.json").read_text())["epochs"]
        rec["epoch_img_per_s"] = [round(e["images"] / e["seconds"], 1) for e in epochs]
        return rec


def distrain_epochs(metrics: Path) -> list[dict]:
    """Per epoch: training images, and seconds from the event before (start, checkpoint) to its
    `train` event."""
    events = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    out, last = [], None
    for ev in events:
        if ev["event"] == "train" and last is not None:
            out.append({"epoch": ev["epoch"], "images": ev["samples"],
                        "seconds": ev["time"] - last})
        last = ev["time"]
    return out


def write_data(root: Path, n_train: int, n_test: int) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from fakes import write_fake_cifar10  # the CIFAR-10 python layout, as the tests use it

    write_fake_cifar10(root, n_train=n_train, n_test=n_test, seed=0)
    return root


def groups(a) -> list[tuple[int, str, list[str]]]:
    """(processes, malloc, contestants) in the order they run; the seed loop runs on one process."""
    return [(n, m, [c for c in a.contestants if not (c == "seed" and n > 1)])
            for n in a.procs for m in a.malloc]


def run_all(a, root: Path, cores: int) -> list[dict]:
    runs = []
    for r in range(a.rounds):
        for nprocs, malloc, names in groups(a):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                rec = run_one(name, nprocs, malloc, a, root, cores)
                rec["round"] = r
                runs.append(rec)
                print(f"# round {r + 1}/{a.rounds} {name:<10} procs {nprocs} malloc {malloc:<3}: "
                      f"{rec['epoch_img_per_s']} img/s, user {rec['user_s']} s, "
                      f"sys {rec['sys_s']} s, "
                      f"{rec['minor_faults']} faults, RSS {rec['sum_peak_rss_mib']} MiB, "
                      f"load {rec['load_1min']}",
                      file=sys.stderr, flush=True)
    return runs


def summarise(runs: list[dict], a) -> list[dict]:
    rows = []
    for nprocs, malloc, names in groups(a):
        for name in names:
            key = (name, nprocs, malloc)
            rs = [r for r in runs if (r["contestant"], r["procs"], r["malloc"]) == key]
            per_epoch = list(zip(*(r["epoch_img_per_s"] for r in rs)))
            row = {"contestant": name, "procs": nprocs, "malloc": malloc, "runs": len(rs),
                   "epoch_img_per_s": [statistics.median(e) for e in per_epoch],
                   "epoch_spread": [[min(e), max(e)] for e in per_epoch]}
            for k in ("wall_s", "user_s", "sys_s", "minor_faults", "sum_peak_rss_mib",
                      "peak_pss_mib", "load_1min"):
                row[k] = statistics.median(r[k] for r in rs)
            rows.append(row)
    for row in rows:  # distrain / each peer, same processes and malloc column, per epoch
        ours = next((o for o in rows if (o["contestant"], o["procs"], o["malloc"]) ==
                     ("distrain", row["procs"], row["malloc"])), None)
        if ours is None or row is ours:
            continue
        theirs = row["epoch_img_per_s"]
        if row["contestant"] == "bench":  # one rate, read against each of train's epochs
            theirs = theirs * len(ours["epoch_img_per_s"])
        row["distrain_over_this"] = [round(o / t, 3)
                                     for o, t in zip(ours["epoch_img_per_s"], theirs)]
    return rows


def format_table(result: dict) -> str:
    m = result["machine"]
    out = [f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}; "
           f"load average {m['load_start']} at start, {m['load_end']} at end",
           f"recipe: cifar10_quick fp32, batch {result['batch_size']}/process, {result['epochs']} "
           f"epochs, {result['train_samples']:,} train / {result['test_samples']:,} test images "
           f"(fake CIFAR-10), {result['workers']} DataLoader workers for the peers; median of "
           f"{result['rounds']} round(s)", ""]
    eps = {id(r): "  ".join(f"{v:,.0f} [{lo:,.0f}..{hi:,.0f}]" for v, (lo, hi) in
                            zip(r["epoch_img_per_s"], r["epoch_spread"])) for r in result["rows"]}
    w = max(len(e) for e in [*eps.values(), "img/s per epoch [min..max]"]) + 2
    out.append(f"{'contestant':<11}{'procs':>5} {'malloc':>6}  {'img/s per epoch [min..max]':<{w}}"
               f"{'distrain/this':<16}{'user s':>7}{'sys s':>7}{'faults':>8}{'wall s':>8}"
               f"{'RSS MiB':>9}{'PSS MiB':>9}")
    for r in result["rows"]:
        vs = " ".join(f"{x:.2f}" for x in r.get("distrain_over_this", [])) or "-"
        out.append(f"{r['contestant']:<11}{r['procs']:>5} {r['malloc']:>6}  {eps[id(r)]:<{w}}"
                   f"{vs:<16}{r['user_s']:>7.1f}{r['sys_s']:>7.1f}{r['minor_faults'] / 1e6:>7.2f}M"
                   f"{r['wall_s']:>8.1f}{r['sum_peak_rss_mib']:>9,.0f}"
                   f"{r['peak_pss_mib']:>9,.0f}")
    out += ["", "distrain/this: distrain's img/s / this contestant's, per epoch (same processes,",
            "  same malloc column; for bench: train's epoch / bench's one rate, within 0.95..1.05",
            "  wanted for the steady epochs); RSS: sum of the tree's per-process peak RSS;",
            "  PSS: peak of the tree's summed PSS"]
    return "\n".join(out)


def machine() -> dict:
    import torch

    from distrain.bench import _cpu_name

    return {"cpu": _cpu_name() or platform.processor(), "cores": len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_start": round(os.getloadavg()[0], 2)}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer", choices=sorted(PEERS), help=argparse.SUPPRESS)  # runs one peer
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--contestants", type=lambda s: s.split(","), default=list(CONTESTANTS))
    p.add_argument("--procs", type=lambda s: [int(v) for v in str(s).split(",")], default=[1, 2])
    p.add_argument("--malloc", type=lambda s: s.split(","), default=["off", "on"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="peers' DataLoader workers/process")
    p.add_argument("--train-samples", type=int, default=50_000)
    p.add_argument("--test-samples", type=int, default=10_000)
    p.add_argument("--max-steps", type=int, default=None,
                   help="steps per epoch (smoke tests; with --epochs 1: memory on the whole split)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="per process (cores/processes)")
    p.add_argument("--json", metavar="FILE", help="also write the runs and the table's rows here")
    a = p.parse_args(argv)
    bad = [c for c in a.contestants if c not in CONTESTANTS]
    bad += [m for m in a.malloc if m not in ("off", "on")]
    if bad:
        p.error(f"unknown contestant or malloc value: {', '.join(bad)}")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.peer:
        if isinstance(a.procs, list):
            a.procs = a.procs[0]
        PEERS[a.peer](a)
        return 0
    # SIGTERM unwinds like Ctrl-C, so that run_one's cleanup kills the running contestant's tree.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = {"machine": machine(), "epochs": a.epochs, "batch_size": a.batch_size,
              "workers": a.workers,
              "train_samples": a.train_samples, "test_samples": a.test_samples, "rounds": a.rounds,
              "command": " ".join([sys.executable, *sys.argv])}
    with tempfile.TemporaryDirectory(prefix="peers-data-") as tmp:
        root = write_data(Path(tmp), a.train_samples, a.test_samples)
        result["runs"] = run_all(a, root, result["machine"]["cores"])
    result["machine"]["load_end"] = round(os.getloadavg()[0], 2)
    result["rows"] = summarise(result["runs"], a)
    print(format_table(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
