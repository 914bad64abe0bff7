"""distrain's training step against the bare PyTorch loop, each in a fresh process, interleaved.

Contestants, on the same model, batch size, precision, learning rate and device (one process each):

- ``distrain``: ``distrain bench --json`` (the real loop with its input pipeline, the sanity
  evaluation first; augmentation off, as the bare loop has none);
- ``bare``: ``benchmarks/bare_loop.py --json`` (a pre-normalised tensor in memory, ``x[idx]``,
  forward, backward, distrain's own optimizer: nothing else).

Both time ``--repeats`` windows of ``--steps`` steps after ``--warmup`` and report the median
window. Why separate processes (``benchmarks/compare.py`` interleaves windows in one process): the
allocator setting distrain makes at start-up (distrain/allocator.py) is process-wide, so in one
process the bare loop would run under it too. ``--malloc off,on``: ``off`` is glibc's defaults for
both (``DISTRAIN_MALLOC=0`` for distrain), ``on`` is distrain's setting and the same settings as
``MALLOC_*`` variables for the bare loop (the fair column). The headline ratio is distrain as it
runs (on) over the bare loop as a user runs it (off); the fair ratio is on over on. Runs alternate,
the order rotated every round; ratios are medians over rounds of back-to-back pairs.

    .venv/bin/python benchmarks/vs_bare.py --model vgg16 --batch-size 32 --rounds 3   # VGG16 32x32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from peers import environment, machine  # noqa: E402  (one owner for the env and machine lines)


def command(name: str, a, work: Path) -> list[str]:
    timing = ["--steps", str(a.steps), "--warmup", str(a.warmup), "--repeats", str(a.repeats)]
    if name == "bare":
        return [sys.executable, str(HERE / "bare_loop.py"), "--json", "--device", "cpu",
                "--precision", "no", "--model", a.model, "--batch-size", str(a.batch_size),
                "--samples", str(a.samples), "--lr", str(a.lr), *timing]
    over = {"output_dir": work / "run", "model.name": a.model, "data.name": "synthetic",
            "data.max_train_samples": a.samples, "data.max_test_samples": a.batch_size,
            "data.augment": "false", "train.batch_size": a.batch_size, "train.lr": a.lr,
            "train.optimizer": "sgd", "train.mixed_precision": "no", "train.device": "cpu",
            "log.tensorboard": "false", "log.progress": "none"}
    return [sys.executable, "-m", "distrain", "bench", "--json", *timing,
            *(f"{k}={v}" for k, v in over.items())]


def run_one(name: str, malloc: str, a) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"vs-bare-{name}-") as tmp:
        env = environment("bench" if name == "distrain" else "bare", 1, malloc,
                          a.threads or len(os.sched_getaffinity(0)))
        work = Path(tmp)
        with open(work / "stdout.txt", "w") as out, open(work / "stderr.txt", "w") as err:
            proc = subprocess.Popen(command(name, a, work), env=env, cwd=tmp, stdout=out,
                                    stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)  # with the CPU times of the process
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            tail = (work / "stderr.txt").read_text()[-3000:]
            raise RuntimeError(f"{name} (malloc {malloc}) exited {code}:\n{tail}")
        r = json.loads((work / "stdout.txt").read_text().strip().splitlines()[-1])
        rate = r["train_img_per_s"] if name == "distrain" else r["img_per_s"]
        windows = r["train_windows_img_per_s"] if name == "distrain" else r["windows_img_per_s"]
        return {"contestant": name, "malloc": malloc, "img_per_s": round(rate, 2),
                "windows": windows, "user_s": round(usage.ru_utime, 2),
                "sys_s": round(usage.ru_stime, 2), "minor_faults": usage.ru_minflt,
                "load_1min": round(os.getloadavg()[0], 2)}


def run_all(a) -> list[dict]:
    runs, pairs = [], [(n, m) for m in a.malloc for n in ("distrain", "bare")]
    for r in range(a.rounds):
        order = pairs[r % len(pairs):] + pairs[:r % len(pairs)]
        for name, malloc in order:
            rec = run_one(name, malloc, a)
            rec["round"] = r
            runs.append(rec)
            print(f"# round {r + 1}/{a.rounds} {name:8s} malloc {malloc:3s}: "
                  f"{rec['img_per_s']:,.1f} img/s (windows {rec['windows']}), user {rec['user_s']} s, "
                  f"sys {rec['sys_s']} s, {rec['minor_faults']:,} faults, load {rec['load_1min']}", file=sys.stderr, flush=True)
    return runs


def _median_ratio(runs: list[dict], top: tuple, bottom: tuple) -> tuple:
    """Median and range over rounds of top's rate / bottom's rate in the same round."""
    by = {(x["round"], x["contestant"], x["malloc"]): x["img_per_s"] for x in runs}
    ratios = [by[(r, *top)] / by[(r, *bottom)] for r in sorted({x["round"] for x in runs})
              if (r, *top) in by and (r, *bottom) in by]
    if not ratios:
        return None, []
    return statistics.median(ratios), ratios


def summarise(runs: list[dict]) -> dict:
    rows = []
    for (name, malloc) in sorted({(x["contestant"], x["malloc"]) for x in runs}):
        rates = [x["img_per_s"] for x in runs if (x["contestant"], x["malloc"]) == (name, malloc)]
        rows.append({"contestant": name, "malloc": malloc, "median": statistics.median(rates),
                     "min": min(rates), "max": max(rates)})
    ratios = {}
    for label, top, bottom in (("distrain / bare, as each runs (on / off)", ("distrain", "on"),
                                ("bare", "off")),
                               ("distrain / bare, both malloc on (fair)", ("distrain", "on"),
                                ("bare", "on")),
                               ("distrain / bare, both malloc off", ("distrain", "off"),
                                ("bare", "off"))):
        med, all_ = _median_ratio(runs, top, bottom)
        if med is not None:
            ratios[label] = {"median": round(med, 3), "rounds": [round(v, 3) for v in all_]}
    return {"rows": rows, "ratios": ratios}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vgg16")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--samples", type=int, default=512, help="training images (synthetic)")
    p.add_argument("--steps", type=int, default=5, help="steps per timed window")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed windows per run (median)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--malloc", type=lambda s: s.split(","), default=["off", "on"])
    p.add_argument("--threads", type=int, default=None, help="default: the cores")
    p.add_argument("--json", metavar="FILE", help="also write the runs and the summary here")
    a = p.parse_args(argv)
    m = machine()
    runs = run_all(a)
    summary = summarise(runs)
    print(f"machine: {m}")
    print(f"recipe: {a.model}, batch {a.batch_size}, fp32, cpu, {a.repeats} windows of {a.steps} "
          f"steps after {a.warmup} warm-up, {a.rounds} round(s); load at end "
          f"{os.getloadavg()[0]:.2f}")
    for row in summary["rows"]:
        print(f"  {row['contestant']:8s} malloc {row['malloc']:3s} {row['median']:9,.1f} img/s "
              f"[{row['min']:,.1f}..{row['max']:,.1f}]")
    for label, r in summary["ratios"].items():
        print(f"  {label}: {r['median']:.3f}x (rounds {r['rounds']})")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": m, "args": vars(a), "runs": runs,
                                            **summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
