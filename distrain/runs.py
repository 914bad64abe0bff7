"""`distrain runs`: one row per run directory, from its config.yaml and metrics.jsonl.

Invariants:
- Read only: a run in progress is read while it writes (a torn last line of metrics.jsonl is
  skipped); nothing in a run directory is locked, created or changed.
- Status: ``running`` while the run's lock is held (distrain.runlock), else how the records since
  its last ``start`` end (distrain.metrics.outcome_of: finished / stopped / diverged), else
  ``failed`` (it ended without saying how: a crash, a kill, a user error).
- The extra columns are the dotted config keys whose values are not all the same across the listed
  runs (output_dir and the keys already shown left out); with one run there are none.
- images/s counts optimizer steps x global batch over the time between consecutive records with
  training between them (so evaluations are left out; data loading and checkpoint writes are in).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from distrain.errors import UserError
from distrain.fsio import atomic_write_bytes, describe_os_error
from distrain.metrics import outcome_of, read_metrics
from distrain.runlock import is_running
from distrain.trackers import flatten

# Config keys that have a column of their own (or say nothing about how runs differ).
SHOWN_KEYS = {"output_dir", "model.name", "data.name", "train.lr", "train.epochs"}
# Columns of --json / --csv, in order; the table shows epochs as done/planned and wall as h:mm:ss.
COLUMNS = ("name", "status", "model", "data", "world_size", "global_batch", "lr", "epochs_done",
           "epochs_planned", "best_accuracy", "final_accuracy", "wall_s", "images_per_s")
TABLE = ("name", "status", "model", "data", "world_size", "global_batch", "lr", "epochs",
         "best_accuracy", "final_accuracy", "wall", "images_per_s")
SORT_ALIASES = {"epochs": "epochs_done", "wall": "wall_s"}


@dataclass
class Run:
    path: Path
    config: dict  # flat: {"train.lr": 0.1, ...}; {} without config.yaml
    records: list
    running: bool


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() or (path / "metrics.jsonl").is_file()


def find_runs(patterns: list[str]) -> list[Path]:
    """Run directories named by ``patterns``: run dirs, globs of them, or folders holding them."""
    found: dict[Path, Path] = {}
    for pattern in patterns:
        paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not paths:
            raise UserError(f"no run directory matches '{pattern}'")
        for p in map(Path, paths):
            if is_run_dir(p):
                runs = [p]
            elif p.is_dir():
                runs = sorted(c for c in p.iterdir() if c.is_dir() and is_run_dir(c))
            else:
                runs = []
            if not runs and not glob.has_magic(pattern):
                raise UserError(f"'{p}' is not a run directory (no config.yaml or metrics.jsonl) "
                                f"and holds none")
            for r in runs:
                found.setdefault(r.resolve(), r)
    if not found:
        raise UserError(f"no run directory among {' '.join(patterns)}")
    return list(found.values())


def load_run(path: Path) -> Run:
    config: dict = {}
    try:
        data = yaml.safe_load((path / "config.yaml").read_text())
        config = flatten(data) if isinstance(data, dict) else {}
    except (OSError, yaml.YAMLError):
        pass
    m = path / "metrics.jsonl"
    records = read_metrics(m) if m.is_file() else []
    return Run(path, config, records, is_running(path))


def last_segment(records: list) -> list:
    """The records since the last ``start`` (all of them if there is none)."""
    starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
    return records[starts[-1]:] if starts else records


def status(run: Run) -> str:
    if run.running:
        return "running"
    ends = [o for o in map(outcome_of, last_segment(run.records)) if o]
    return ends[-1] if ends else "failed"


def _segments(records: list) -> list[list]:
    out: list[list] = []
    for r in records:
        if r.get("event") == "start" or not out:
            out.append([])
        out[-1].append(r)
    return out


def _step(r: dict) -> Optional[int]:
    return r.get("step", r.get("resumed_step"))


def timing(run: Run) -> tuple[Optional[float], Optional[float]]:
    """(wall seconds over all starts, training images per second); None where unknown."""
    wall, images, busy = 0.0, 0.0, 0.0
    segs = _segments(run.records)
    for i, seg in enumerate(segs):
        t = [r["time"] for r in seg if isinstance(r.get("time"), (int, float))]
        if t:
            end = time.time() if run.running and i == len(segs) - 1 else t[-1]
            wall += end - t[0]
        batch = seg[0].get("global_batch") if seg[0].get("event") == "start" else None
        timed = [r for r in seg if _step(r) is not None and isinstance(r.get("time"), (int, float))]
        for a, b in zip(timed, timed[1:]):
            steps = _step(b) - _step(a)
            if batch and steps > 0 and b["time"] > a["time"]:
                images += steps * batch
                busy += b["time"] - a["time"]
    return (wall if segs else None), (images / busy if busy else None)


def _finite(v: Any) -> Optional[float]:
    return v if isinstance(v, (int, float)) and math.isfinite(v) and abs(v) < 1e300 else None


def summarize(run: Run) -> dict:
    c, recs = run.config, run.records
    starts = [r for r in recs if r.get("event") == "start"]
    evals = [r for r in recs if r.get("event") == "eval" and _finite(r.get("accuracy")) is not None]
    epochs = {r.get("epoch") for r in recs if r.get("event") == "train"}
    wall, ips = timing(run)
    return {
        "name": run.path.name, "path": str(run.path), "status": status(run),
        "model": c.get("model.name"), "data": c.get("data.name"),
        "world_size": starts[-1].get("world_size") if starts else None,
        "global_batch": starts[-1].get("global_batch") if starts else None,
        "lr": c.get("train.lr"), "epochs_done": len(epochs),
        "epochs_planned": c.get("train.epochs"),
        "best_accuracy": max((r["accuracy"] for r in evals), default=None),
        "final_accuracy": evals[-1]["accuracy"] if evals else None,
        "wall_s": round(wall, 1) if wall is not None else None,
        "images_per_s": round(ips, 1) if ips is not None else None,
    }


def differing_keys(runs: list[Run], skip=SHOWN_KEYS) -> list[str]:
    keys = sorted({k for r in runs for k in r.config} - set(skip))
    return [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]


def rows_for(runs: list[Run]) -> tuple[list[dict], list[str]]:
    """One row per run (COLUMNS plus the differing config keys), and those keys."""
    diff = differing_keys(runs)
    rows = []
    for r in runs:
        row = summarize(r)
        row.update({k: r.config.get(k) for k in diff})
        rows.append(row)
    names = [row["name"] for row in rows]
    for row in rows:  # two runs with the same folder name (runs/a/x, runs/b/x): show the paths
        if names.count(row["name"]) > 1:
            row["name"] = row["path"]
    return rows, diff


def sort_rows(rows: list[dict], key: str) -> list[dict]:
    """By ``key`` (a column; ``-key`` for descending); runs without a value last either way."""
    desc = key.startswith("-")
    key = key.lstrip("-")
    key = SORT_ALIASES.get(key, key)
    if rows and key not in rows[0]:
        raise UserError(f"--sort: no column '{key}'; choose one of {', '.join(rows[0])}")
    have = [r for r in rows if r.get(key) is not None]
    missing = [r for r in rows if r.get(key) is None]
    try:
        have.sort(key=lambda r: r[key], reverse=desc)
    except TypeError:  # mixed types (a key that is a number in one run, a string in another)
        have.sort(key=lambda r: str(r[key]), reverse=desc)
    return have + missing


# -- output ---------------------------------------------------------------------------------------
def _cell(key: str, row: dict) -> str:
    if key == "epochs":
        planned = row["epochs_planned"]
        return f"{row['epochs_done']}/{planned if planned is not None else '?'}"
    if key == "wall":
        s = row["wall_s"]
        if s is None:
            return "-"
        h, rest = divmod(int(round(s)), 3600)
        return f"{h}:{rest // 60:02d}:{rest % 60:02d}"
    v = row.get(key)
    if v is None:
        return "-"
    if key.endswith("accuracy"):
        return f"{v:.4f}"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def format_table(rows: list[dict], diff: list[str]) -> str:
    cols = [*TABLE, *diff]
    cells = [[_cell(c, r) for c in cols] for r in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells]
    return "\n".join(lines) + "\n"


def format_csv(rows: list[dict], diff: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, [*COLUMNS, "path", *diff], extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


def main(patterns: list[str], sort: Optional[str] = None, as_json: bool = False,
         as_csv: bool = False, plot_path: Optional[str] = None) -> int:
    """`distrain runs`: the table (or JSON / CSV) on stdout, the plot into ``plot_path``."""
    if as_json and as_csv:
        raise UserError("--json and --csv exclude each other; choose one")
    runs = [load_run(p) for p in find_runs(patterns)]
    rows, diff = rows_for(runs)
    if sort:
        order = {id(r): i for i, r in enumerate(rows)}
        rows = sort_rows(rows, sort)
        runs = [runs[order[id(r)]] for r in rows]
    if plot_path:
        save_plot(runs, rows, plot_path)
        print(f"distrain runs: plot of {len(runs)} run{'s' if len(runs) > 1 else ''} written to "
              f"{plot_path}", file=sys.stderr)
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    elif as_csv:
        sys.stdout.write(format_csv(rows, diff))
    else:
        sys.stdout.write(format_table(rows, diff))
    return 0


# -- plot ----------------------------------------------------------------------------------------
def legend_label(run: Run, name: str, keys: list[str], most: int = 4) -> str:
    """The run's name and its values of the keys the runs differ in (the first ``most``)."""
    parts = [f"{k}={run.config.get(k)}" for k in keys[:most]]
    if len(keys) > most:
        parts.append("...")
    return f"{name}: {', '.join(parts)}" if parts else name


def _curve(run: Run, event: str, field: str) -> tuple[list, list]:
    pts = [(r["step"], _finite(r.get(field))) for r in run.records
           if r.get("event") == event and isinstance(r.get("step"), int)]
    pts = [(s, v) for s, v in pts if v is not None and (field != "loss" or v > 0)]  # log axis
    return [s for s, _ in pts], [v for _, v in pts]


def make_figure(runs: list[Run], names: list[str]):
    """Eval accuracy (left) and epoch train loss (right) against the step, one line per run each.

    A run keeps one colour on both sides; the legend names the config keys the runs differ in.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("--plot needs matplotlib; install it with "
                        "pip install 'distrain[plot]'") from None
    keys = differing_keys(runs, skip={"output_dir"})
    fig = Figure(figsize=(12, 5), layout="constrained")
    FigureCanvasAgg(fig)
    acc, loss = fig.subplots(1, 2)
    for i, (run, name) in enumerate(zip(runs, names)):
        style = {"color": f"C{i % 10}", "linestyle": ("-", "--", ":", "-.")[i // 10 % 4],
                 "marker": "o", "markersize": 3, "label": legend_label(run, name, keys)}
        acc.plot(*_curve(run, "eval", "accuracy"), **style)
        loss.plot(*_curve(run, "train", "loss"), **style)
    acc.set(title="evaluation accuracy", xlabel="optimizer step", ylabel="accuracy")
    # Log scale: a diverging run's loss (1e7, say) must not flatten the others' curves.
    loss.set(title="training loss (epoch mean)", xlabel="optimizer step", ylabel="loss (log scale)",
             yscale="log")
    for ax in (acc, loss):
        ax.grid(alpha=0.3)
    fig.legend(*acc.get_legend_handles_labels(), loc="outside lower center",
               ncols=min(3, max(1, len(runs))), fontsize="small")
    fig.suptitle(f"distrain runs: {len(runs)} run{'s' if len(runs) != 1 else ''}")
    return fig


def save_plot(runs: list[Run], rows: list[dict], path: str) -> None:
    fig = make_figure(runs, [r["name"] for r in rows])
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    try:
        atomic_write_bytes(Path(path), buf.getvalue())
    except OSError as e:
        raise UserError(f"--plot: cannot write '{path}': {describe_os_error(e)}") from None
