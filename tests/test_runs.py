"""`distrain runs` on the four kinds of run a SLURM array leaves: a finished run and a run stopped
by SIGTERM (both real), a diverged run (its metrics.jsonl written here: the `diverged` record is the
trainer's) and a run in progress (its lock held here, its last line torn), plus one run outside the
array. The table, JSON, CSV, sorting, the glob, and the plot.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import metrics_events, read_jsonl, run_distrain, train_until_sigterm
from distrain.runlock import RunLock
from distrain.runs import COLUMNS, find_runs, load_run, make_figure, rows_for, status
from distrain.signals import EXIT_STOPPED

pytestmark = pytest.mark.timeout(400)

# 768 / (32 x 2 accumulation steps) = 12 steps per epoch, a checkpoint every 3.
BASE = {"data.name": "synthetic", "data.max_train_samples": 768, "data.max_test_samples": 64,
        "train.epochs": 2, "train.batch_size": 32, "train.grad_accum_steps": 2,
        "checkpoint.every_steps": 3, "log.tensorboard": "false", "log.progress": "lines",
        "log.every_steps": 3}


def _args(run: Path, **over) -> list[str]:
    return ["train", *(f"{k}={v}" for k, v in {"output_dir": run, **BASE, **over}.items())]


def _fake_run(src: Path, dst: Path, records: list, config_change: dict) -> None:
    """A run directory with ``src``'s config (changed by ``config_change``) and these records."""
    dst.mkdir()
    cfg = yaml.safe_load((src / "config.yaml").read_text())
    for key, value in config_change.items():
        section, name = key.split(".")
        cfg[section][name] = value
    cfg["output_dir"] = str(dst)
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def array(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    done, stopped = root / "slurm-123_0", root / "slurm-123_1"
    proc = run_distrain(_args(done))
    assert proc.returncode == 0, proc.stderr[-4000:]
    rc = train_until_sigterm(_args(stopped, **{"train.seed": 1}), stopped, root / "stopped.log")
    assert rc == EXIT_STOPPED, (root / "stopped.log").read_text()[-4000:]
    recs = read_jsonl(done / "metrics.jsonl")
    first_eval = next(i for i, r in enumerate(recs) if r["event"] == "eval")
    # Diverged: the loss went non-finite in the first epoch (NaN is written as null); the run ended.
    diverged = [*recs[:first_eval - 1], {**recs[first_eval - 1], "loss": None},
                {"event": "diverged", "step": recs[first_eval]["step"], "loss": None,
                 "time": recs[first_eval]["time"]}]
    _fake_run(done, root / "slurm-123_2", diverged, {"train.lr": 10.0})
    # In progress: the first epoch, and a line being written.
    running = root / "slurm-123_3"
    _fake_run(done, running, recs[:first_eval + 1], {})
    with open(running / "metrics.jsonl", "a") as f:
        f.write('{"event": "checkpoint", "st')
    other = root / "elsewhere"
    shutil.copytree(done, other)
    with RunLock(running):
        yield root


def _runs_cli(*args: str, check: bool = True):
    proc = run_distrain(["runs", *map(str, args)])
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_statuses_accuracies_and_differing_keys(array):
    rows = json.loads(_runs_cli(array / "slurm-123_*", "--json").stdout)
    by = {r["name"]: r for r in rows}
    assert list(by) == [f"slurm-123_{i}" for i in range(4)]  # the glob, not `elsewhere`
    assert {n: r["status"] for n, r in by.items()} == {
        "slurm-123_0": "finished", "slurm-123_1": "stopped", "slurm-123_2": "diverged",
        "slurm-123_3": "running"}
    done = array / "slurm-123_0"
    evals = metrics_events(done, "eval")
    fin = by["slurm-123_0"]
    assert fin["best_accuracy"] == max(e["accuracy"] for e in evals)
    assert fin["final_accuracy"] == evals[-1]["accuracy"]
    assert (fin["model"], fin["data"], fin["world_size"], fin["global_batch"], fin["lr"]) == \
        ("cifar10_quick", "synthetic", 1, 64, 0.01)
    assert (fin["epochs_done"], fin["epochs_planned"]) == (2, 2)
    assert fin["wall_s"] > 0 and fin["images_per_s"] > 0
    assert by["slurm-123_1"]["epochs_done"] < 2 and by["slurm-123_2"]["best_accuracy"] is None
    assert by["slurm-123_2"]["lr"] == 10.0 and by["slurm-123_3"]["epochs_done"] == 1
    # train.seed is the one config key besides the shown ones that differs.
    assert list(rows[0]) == [*COLUMNS[:1], "path", *COLUMNS[1:], "train.seed"]
    assert [r["train.seed"] for r in rows] == [0, 1, 0, 0]


@pytest.mark.slow
def test_table_sort_csv_and_a_folder_of_runs(array):
    table = _runs_cli(array / "slurm-123_*", "--sort=-best_accuracy").stdout.splitlines()
    assert table[0].split() == ["name", "status", "model", "data", "world_size", "global_batch",
                                "lr", "epochs", "best_accuracy", "final_accuracy", "wall",
                                "images_per_s", "train.seed"]
    rows = json.loads(_runs_cli(array / "slurm-123_*", "--json").stdout)
    best = sorted((r for r in rows if r["best_accuracy"] is not None),
                  key=lambda r: -r["best_accuracy"])
    want = [r["name"] for r in best] + [r["name"] for r in rows if r["best_accuracy"] is None]
    assert [line.split()[0] for line in table[1:]] == want
    line = {line.split()[0]: line.split() for line in table[1:]}
    assert line["slurm-123_0"][1] == "finished" and line["slurm-123_0"][7] == "2/2"
    assert line["slurm-123_2"][8] == "-"  # no accuracy
    parsed = list(csv.DictReader(io.StringIO(_runs_cli(array, "--csv").stdout)))
    assert sorted(r["name"] for r in parsed) == ["elsewhere", *(f"slurm-123_{i}" for i in range(4))]
    assert {r["name"]: r["status"] for r in parsed}["elsewhere"] == "finished"


@pytest.mark.slow
def test_plot_has_one_line_per_run_on_each_axis(array, tmp_path):
    from PIL import Image

    png = tmp_path / "runs.png"
    proc = _runs_cli(array / "slurm-123_*", "--plot", png)
    assert f"written to {png}" in proc.stderr
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] >= 800 and im.size[1] >= 400
    runs = [load_run(p) for p in find_runs([str(array / "slurm-123_*")])]
    rows, _ = rows_for(runs)
    fig = make_figure(runs, [r["name"] for r in rows])
    acc, loss = fig.axes
    assert len(acc.get_lines()) == len(loss.get_lines()) == 4
    evals = metrics_events(array / "slurm-123_0", "eval")
    x, y = acc.get_lines()[0].get_data()
    assert list(x) == [e["step"] for e in evals] and list(y) == [e["accuracy"] for e in evals]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[0] == "slurm-123_0: train.lr=0.01, train.seed=0"
    assert labels[2] == "slurm-123_2: train.lr=10.0, train.seed=0"
    # Each run keeps its colour on both sides.
    assert [a.get_color() for a in acc.get_lines()] == [b.get_color() for b in loss.get_lines()]


def test_bad_arguments_are_one_line_errors(tmp_path):
    for args, words in [((tmp_path / "nope",), "is not a run directory"),
                        ((f"{tmp_path}/slurm-9_*",), "no run directory matches"),
                        ((tmp_path, "--json", "--csv"), "exclude each other")]:
        if args[0] == tmp_path:
            (tmp_path / "r").mkdir(exist_ok=True)
            (tmp_path / "r" / "metrics.jsonl").write_text("")
        proc = _runs_cli(*args, check=False)
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""


def test_help_lists_the_options(capsys):
    from distrain import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["runs", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(opt in out for opt in ("--sort", "--json", "--csv", "--plot", "RUN", "slurm-123_*"))


@pytest.mark.parametrize("events, want", [
    # stopped, resumed, finished
    (["start", "train", "checkpoint:stop", "start", "train", "end"], "finished"),
    (["start", "train", "end", "start"], "failed"),  # the last start said nothing yet, and no lock
    (["start", "checkpoint:epoch", "stopped"], "stopped"),
    (["start", "train", "checkpoint:stop"], "stopped"),  # written before the `stopped` record
    (["start", "diverged"], "diverged"),
    ([], "failed"),
])
def test_status_comes_from_the_records_since_the_last_start(tmp_path, events, want):
    recs = []
    for i, e in enumerate(events):
        kind, _, reason = e.partition(":")
        rec = {"event": kind, "step": i, "time": 1000.0 + i}
        recs.append({**rec, "reason": reason} if reason else rec)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert status(load_run(tmp_path)) == want
