"""Console output: a live bar on a terminal, plain lines on a pipe or in CI, quiet ranks, banner and summary."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

from conftest import distrain_cmd, run_distrain, smoke_args, subprocess_env
from distrain.progress import Progress, _fmt, choose_mode


class FakeStream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


# -- unit ---------------------------------------------------------------------------------------------

def test_auto_mode_follows_the_stream_and_ci(monkeypatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert choose_mode("auto", FakeStream(tty=True)) == "bar"
    assert choose_mode("auto", FakeStream(tty=False)) == "lines"
    assert choose_mode("auto", object()) == "lines"  # no isatty at all
    monkeypatch.setenv("CI", "true")
    assert choose_mode("auto", FakeStream(tty=True)) == "lines"
    monkeypatch.delenv("CI")
    monkeypatch.setenv("TERM", "dumb")
    assert choose_mode("auto", FakeStream(tty=True)) == "lines"
    for explicit in ("bar", "lines", "none"):
        assert choose_mode(explicit, FakeStream(tty=False)) == explicit


def test_lines_mode_prints_one_plain_line_per_interval() -> None:
    s = FakeStream(tty=False)
    p = Progress(enabled=True, mode="lines", stream=s)
    p.write("banner")
    p.start_epoch(0, 10, epochs=3, global_step=0, run_total_steps=30)
    for step in range(1, 11):
        p.tick(step, step)  # ticks never print on a pipe
        if step % 5 == 0:
            p.update(step, loss=2.5, img_per_s=1234.5, lr=0.01, global_step=step)
    p.end_epoch()
    p.write("epoch 1/3 train: ...")
    p.close()
    out = s.getvalue()
    assert "\r" not in out and "\033" not in out
    lines = out.splitlines()
    assert lines[0] == "banner" and lines[-1] == "epoch 1/3 train: ..."
    steps = [l for l in lines if "step " in l]
    assert len(steps) == 2
    assert re.search(r"epoch 1/3 \| step 5/10 \| loss 2\.5000 \| 1,234 img/s \| lr 0\.01 \| eta \d+:\d\d \| run eta \d+:\d\d",
                     steps[0]), steps[0]
    assert "step 10/10" in steps[1]


def test_bar_mode_redraws_in_place_and_log_lines_do_not_tear_it(monkeypatch) -> None:
    s = FakeStream(tty=True)
    p = Progress(enabled=True, mode="bar", stream=s)
    monkeypatch.setattr(p, "_columns", lambda: 200)
    p.REDRAW_S = 0.0  # draw at every tick
    p.start_epoch(1, 4, epochs=2, global_step=4, run_total_steps=8)
    p.tick(1, 5)
    p.update(2, loss=1.25, img_per_s=99.0, lr=0.1, global_step=6)
    p.write("warning: something")
    p.tick(3, 7)
    p.update(4, loss=1.0, img_per_s=100.0, lr=0.05, global_step=8)
    p.end_epoch()
    p.write("epoch 2/2 train: done")
    out = s.getvalue()
    assert out.count("\r\033[K") >= 4
    # The log line starts on a cleared line, never glued to a bar.
    assert "\r\033[Kwarning: something\n" in out
    assert "] epoch 2/2 | step 2/4 | loss 1.2500 | 99 img/s | lr 0.1" in out
    assert "100% [" + "#" * Progress.WIDTH + "] epoch 2/2 | step 4/4" in out
    # After the epoch the finished bar stays, and the next line starts on a fresh line.
    assert out.endswith("\nepoch 2/2 train: done\n")


def test_bar_is_cut_to_the_terminal_width(monkeypatch) -> None:
    s = FakeStream(tty=True)
    p = Progress(enabled=True, mode="bar", stream=s)
    monkeypatch.setattr(p, "_columns", lambda: 40)
    p.start_epoch(0, 100, epochs=10, global_step=0, run_total_steps=1000)
    p.update(50, loss=1.0, img_per_s=5.0, lr=0.1, global_step=50)
    drawn = s.getvalue().split("\r\033[K")[-1]
    assert len(drawn) <= 39 and drawn.endswith("...")


def test_tick_is_throttled_and_silent_when_disabled() -> None:
    s = FakeStream(tty=True)
    p = Progress(enabled=True, mode="bar", stream=s)
    p.start_epoch(0, 1000)
    for step in range(1, 1001):
        p.tick(step)
    assert s.getvalue().count("\r") < 50  # not one redraw per step
    for mode in ("bar", "lines"):
        quiet = FakeStream(tty=True)
        _one_short_epoch(Progress(enabled=False, mode=mode, stream=quiet))  # every rank but the main one
        assert quiet.getvalue() == ""


def _one_short_epoch(p: Progress) -> None:
    """A banner line, then one two-step epoch through every call the engine makes."""
    p.write("banner")
    p.start_epoch(0, 2)
    p.tick(1)
    p.update(2, loss=1.0, img_per_s=1.0, lr=0.1)
    p.close()


def test_none_mode_keeps_log_lines_only() -> None:
    s = FakeStream(tty=True)
    _one_short_epoch(Progress(enabled=True, mode="none", stream=s))
    assert s.getvalue() == "banner\n"


def test_eta_from_the_pace_so_far(monkeypatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    p = Progress(enabled=True, mode="lines", stream=FakeStream(False))
    p.start_epoch(0, 10, done=0, epochs=2, global_step=0, run_total_steps=20)
    clock[0] = 104.0
    p.update(4, loss=1.0, img_per_s=1.0, lr=0.1, global_step=4)  # 1 s per step
    epoch_eta, run_eta = p.eta()
    assert epoch_eta == pytest.approx(6.0) and run_eta == pytest.approx(16.0)
    # A resumed epoch counts only the steps done since it (re)started.
    p.start_epoch(1, 10, done=5, epochs=2, global_step=15, run_total_steps=20)
    clock[0] = 106.0
    p.update(7, loss=1.0, img_per_s=1.0, lr=0.1, global_step=17)
    assert p.eta()[0] == pytest.approx(3.0)


def test_log_intervals_count_within_the_epoch() -> None:
    """Every rank (shown or not) ends an interval at the same steps: every 50th of the epoch and its last."""
    for enabled in (True, False):
        p = Progress(enabled=enabled, mode="lines", stream=FakeStream(False), every_steps=50)
        for epoch in range(3):  # the same positions in every epoch, whatever the global step
            p.start_epoch(epoch, 157, epochs=3, global_step=157 * epoch, run_total_steps=471)
            assert [s for s in range(1, 158) if p.should_log(s, 157)] == [50, 100, 150, 157]
    assert [s for s in range(1, 6) if Progress(False, every_steps=1).should_log(s, 5)] == [1, 2, 3, 4, 5]


def test_run_eta_on_the_last_epochs_lines_too() -> None:
    s = FakeStream(tty=False)
    p = Progress(enabled=True, mode="lines", stream=s)
    p.start_epoch(2, 10, epochs=3, global_step=20, run_total_steps=30)
    p.update(5, loss=1.0, img_per_s=1.0, lr=0.1, global_step=25)
    assert re.search(r"epoch 3/3 \| step 5/10 .*\| eta \d+:\d\d \| run eta \d+:\d\d$", s.getvalue())
    one = FakeStream(tty=False)  # a one-epoch run: the run's ETA is the epoch's, shown once
    p = Progress(enabled=True, mode="lines", stream=one)
    p.start_epoch(0, 10, epochs=1, global_step=0, run_total_steps=10)
    p.update(5, loss=1.0, img_per_s=1.0, lr=0.1, global_step=5)
    assert "| eta " in one.getvalue() and "run eta" not in one.getvalue()


def test_duration_format() -> None:
    assert _fmt(0) == "0:00" and _fmt(59.6) == "1:00" and _fmt(61) == "1:01"
    assert _fmt(3600 + 62) == "1:01:02" and _fmt(-5) == "0:00"
    assert _fmt(3 * 86400 + 7200) == "3d02h"


# -- the real program -----------------------------------------------------------------------------------

def run_in_pty(cmd: list[str], env: dict, timeout: float = 240) -> tuple[int, str]:
    """Run ``cmd`` with stdin/stdout/stderr on a pseudo-terminal (100 columns); returns (exit code, output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
                            cwd=Path(__file__).resolve().parents[1])
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 1.0)
            if not r:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child side closed
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.wait(timeout=30), b"".join(chunks).decode("utf-8", "replace")


def _env_without_ci() -> dict:
    env = subprocess_env()
    env.pop("CI", None)
    env["TERM"] = "xterm"
    return env


BANNER_FIELDS = ["distrain train: cifar10_quick on synthetic", "world size 1", "precision", "fp32",
                 "global 32 = 32 per process x 1 process x 1 accumulation step",
                 "256 train / 64 test images", "parameters", "run dir"]


@pytest.mark.slow
def test_bar_on_a_terminal(tmp_path) -> None:
    out_dir = tmp_path / "run"
    args = smoke_args(out_dir, **{"train.epochs": 2, "log.every_steps": 4})
    rc, out = run_in_pty(distrain_cmd(["train", *args]), _env_without_ci())
    assert rc == 0, out[-3000:]
    assert "\r\x1b[K" in out  # redrawn in place
    bars = re.findall(r"\r\x1b\[K\s*(\d+)% \[[#-]+\] (epoch \d/2 \| step \d+/8[^\r\n]*)", out)
    assert bars, out[-3000:]
    assert any("loss" in b and "img/s" in b and "eta" in b for _, b in bars)
    assert ("100", ) == tuple({pct for pct, b in bars if "step 8/8" in b})
    for field in BANNER_FIELDS:
        assert field in out
    # Each finished bar is followed by the epoch's result on its own line.
    assert re.search(r"step 8/8[^\r\n]*\r\nepoch 1/2 train: loss", out)
    assert "distrain train: done in" in out and "best" in out and str(out_dir.resolve() / "model.safetensors") in out


@pytest.mark.slow
def test_plain_lines_on_a_pipe(tmp_path) -> None:
    out_dir = tmp_path / "run"
    proc = run_distrain(["train", *smoke_args(out_dir, **{"train.epochs": 2, "log.every_steps": 4})], check=True)
    err = proc.stderr
    assert proc.stdout == ""  # stdout is for --json only
    assert "\r" not in err and "\x1b" not in err
    steps = [l for l in err.splitlines() if re.match(r"epoch \d/2 \| step \d+/8 \|", l)]
    # 8 steps per epoch, a line every 4 steps: 2 per epoch.
    assert [re.search(r"step (\d+)/", l).group(1) for l in steps] == ["4", "8", "4", "8"]
    assert all("loss" in l and "img/s" in l and "eta" in l for l in steps)
    for field in BANNER_FIELDS:
        assert field in err
    assert "epoch 2/2 eval:" in err
    summary = err[err.index("distrain train: done in"):]
    assert re.search(r"accuracy\s+final 0\.\d{4} \(loss \d+\.\d{4}\), best 0\.\d{4} at step 16", summary)
    for written in ("model.safetensors", "checkpoints", "metrics.jsonl", "distrain eval --checkpoint"):
        assert written in summary


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_step_lines_count_within_each_epoch(tmp_path) -> None:
    """8 steps per epoch, a line every 3: steps 3, 6 and 8 of each epoch (not global steps 9, 12, ...)."""
    out_dir = tmp_path / "run"
    args = smoke_args(out_dir, **{"train.epochs": 2, "log.every_steps": 3, "log.tensorboard": "true"})
    err = run_distrain(["train", *args], check=True).stderr
    steps = [re.match(r"epoch (\d)/2 \| step (\d+)/8 \|", l) for l in err.splitlines()]
    assert [m.groups() for m in steps if m] == [("1", "3"), ("1", "6"), ("1", "8"),
                                               ("2", "3"), ("2", "6"), ("2", "8")]
    from test_tensorboard import load_events

    assert [e.step for e in load_events(out_dir / "tb").Scalars("train/loss")] == [3, 6, 8, 11, 14, 16]


@pytest.mark.slow
def test_bf16_on_cpu_runs_and_says_so(tmp_path) -> None:
    proc = run_distrain(["train", *smoke_args(tmp_path / "run", **{"train.mixed_precision": "bf16",
                                                                    "data.max_train_samples": 64})], check=True)
    line = next(l for l in proc.stderr.splitlines() if l.strip().startswith("precision"))
    assert "bf16 autocast" in line and "CPU" in line


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_only_the_main_process_talks(tmp_path) -> None:
    out_dir = tmp_path / "run"
    args = smoke_args(out_dir, **{"train.epochs": 1, "log.every_steps": 2, "train.batch_size": 16,
                                  "log.tensorboard": "true"})
    proc = run_distrain(["train", *args], nprocs=2, timeout=240, check=True)
    err = proc.stderr
    assert proc.stdout == ""
    assert err.count("distrain train: cifar10_quick on synthetic") == 1
    assert "world size 2" in err and "global 32 = 16 per process x 2 processes" in err
    steps = [l for l in err.splitlines() if re.match(r"epoch 1/1 \| step \d+/8 \|", l)]
    assert [re.search(r"step (\d+)/", l).group(1) for l in steps] == ["2", "4", "6", "8"]
    assert err.count("epoch 1/1 eval:") == 1 and err.count("distrain train: done in") == 1
    assert "[rank 1]" not in err
    # TensorBoard is written by rank 0 alone: one event file, no per-rank folders.
    files = list((out_dir / "tb").rglob("events.out.tfevents.*"))
    assert len(files) == 1 and files[0].parent == out_dir / "tb"
