"""Console progress on the main process: a live bar on a terminal, plain lines on a pipe or in CI.

Everything goes to stderr (stdout is reserved for `--json`). Modes (`log.progress`):

- ``bar``: one line redrawn in place (``\\r``) with epoch, step, loss, images/s, learning rate and
  ETAs; `tick` redraws it between log intervals (at most ~8 times a second, no device
  synchronisation).
- ``lines``: one plain line per log interval, never a carriage return (pipes, files, SLURM logs,
  CI).
- ``none``: only log lines (banner, epoch results, warnings, summary).
- ``auto``: ``bar`` when stderr is a terminal and neither ``CI`` is set nor ``TERM=dumb``, else
  ``lines``.

Other ranks construct it with ``enabled=False`` and stay quiet. Log lines written with `write` never
tear a live bar: the bar is cleared, the line printed, and the bar comes back at the next update.

Steps are counted within the epoch ("step 43/157" is the 43rd step of this epoch), and so is the
log interval: `should_log` ends one every ``every_steps`` steps of the epoch and at its last step.
It depends on its arguments alone (never on ``enabled`` or the mode), so every rank takes the same
decision: the caller may run collectives when it says yes.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Optional


def choose_mode(mode: str, stream) -> str:
    """Resolve ``auto`` for ``stream``."""
    if mode != "auto":
        return mode
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        tty = False
    if not tty or os.environ.get("CI") or os.environ.get("TERM") == "dumb":
        return "lines"
    return "bar"


class Progress:
    """Progress of the training loop. ``enabled`` is False on every rank but the main one."""

    REDRAW_S = 0.125  # the bar is redrawn at most this often by `tick`
    WIDTH = 20  # bar cells

    def __init__(self, enabled: bool, mode: str = "auto", stream=None, every_steps: int = 50):
        self.stream = stream if stream is not None else sys.stderr
        self.every_steps = max(1, int(every_steps))
        self.mode = choose_mode(mode, self.stream)
        self.enabled = bool(enabled)  # log lines (`write`) are shown whenever enabled
        self.show_steps = self.enabled and self.mode != "none"
        self.epoch = 0
        self.epochs: Optional[int] = None
        self.total = 0
        self.first = 0
        self.step = 0
        self.global_step = 0
        self.total_steps: Optional[int] = None
        self.loss: Optional[float] = None
        self.lr: Optional[float] = None
        self.img_per_s: Optional[float] = None
        now = time.monotonic()
        self.t0 = now
        self._run_t0: Optional[float] = None  # time and step of the first step of this process
        self._run_first = 0
        self._bar_shown = False
        self._last_draw = 0.0

    # -- plain log lines ---------------------------------------------------------------------------
    def write(self, msg: str) -> None:
        """A log line (or several); it never tears a live bar."""
        if not self.enabled:
            return
        self._clear_bar()
        self.stream.write(msg.rstrip("\n") + "\n")
        self.stream.flush()

    # -- the loop ----------------------------------------------------------------------------------
    def should_log(self, step_in_epoch: int, steps_in_epoch: int) -> bool:
        """Whether a log interval ends after step ``step_in_epoch`` (1-based) of the epoch."""
        return step_in_epoch % self.every_steps == 0 or step_in_epoch == steps_in_epoch

    def start_epoch(self, epoch: int, total_steps: int, done: int = 0, epochs: Optional[int] = None,
                    global_step: Optional[int] = None,
                    run_total_steps: Optional[int] = None) -> None:
        """Epoch ``epoch`` (0-based) of ``epochs`` has ``total_steps`` optimizer steps, ``done`` of
        them already done."""
        self.epoch, self.total, self.first, self.step = epoch, total_steps, done, done
        if epochs is not None:
            self.epochs = epochs
        if run_total_steps is not None:
            self.total_steps = run_total_steps
        if global_step is not None:
            self.global_step = global_step
            if self._run_t0 is None:
                self._run_t0, self._run_first = time.monotonic(), global_step
        self.t0 = time.monotonic()

    def tick(self, step: int, global_step: Optional[int] = None) -> None:
        """Called every optimizer step (cheap): moves a live bar between log intervals."""
        self.step = step
        if global_step is not None:
            self.global_step = global_step
        if not self.show_steps or self.mode != "bar":
            return
        now = time.monotonic()
        if now - self._last_draw >= self.REDRAW_S:
            self._draw_bar(now)

    def update(self, step: int, loss: float, img_per_s: float, lr: float,
               global_step: Optional[int] = None) -> None:
        """A log interval ended: fresh loss, throughput and learning rate."""
        self.step, self.loss, self.img_per_s, self.lr = step, loss, img_per_s, lr
        if global_step is not None:
            self.global_step = global_step
        if not self.show_steps:
            return
        if self.mode == "bar":
            self._draw_bar(time.monotonic())
        else:
            self.stream.write(self.status_text() + "\n")
            self.stream.flush()

    def end_epoch(self) -> None:
        """Leave the finished bar on screen (the epoch's result line follows it)."""
        if self._bar_shown:
            self.stream.write("\n")
            self.stream.flush()
            self._bar_shown = False

    def close(self) -> None:
        """End a bar line so that whatever comes next (an error, the shell prompt) starts clean."""
        self.end_epoch()

    # -- text --------------------------------------------------------------------------------------
    def eta(self, now: Optional[float] = None) -> tuple[Optional[float], Optional[float]]:
        """(seconds left in this epoch, seconds left in the run), from this process's own pace."""
        now = time.monotonic() if now is None else now
        done = self.step - self.first
        epoch_eta = (now - self.t0) / done * max(self.total - self.step, 0) if done > 0 else None
        run_eta = None
        if self.total_steps is not None and self._run_t0 is not None:
            run_done = self.global_step - self._run_first
            if run_done > 0:
                left = max(self.total_steps - self.global_step, 0)
                run_eta = (now - self._run_t0) / run_done * left
        return epoch_eta, run_eta

    def status_text(self, now: Optional[float] = None) -> str:
        epoch = f"epoch {self.epoch + 1}" + (f"/{self.epochs}" if self.epochs else "")
        parts = [epoch, f"step {self.step}/{self.total}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.img_per_s is not None:
            parts.append(f"{self.img_per_s:,.0f} img/s")
        if self.lr is not None:
            parts.append(f"lr {self.lr:.3g}")
        epoch_eta, run_eta = self.eta(now)
        if epoch_eta is not None:
            parts.append(f"eta {_fmt(epoch_eta)}")
        if run_eta is not None and self.total_steps != self.total:  # unless the run is this epoch
            parts.append(f"run eta {_fmt(run_eta)}")
        return " | ".join(parts)

    # -- the bar -----------------------------------------------------------------------------------
    def _columns(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, ValueError, OSError):
            return shutil.get_terminal_size((100, 24)).columns

    def _draw_bar(self, now: float) -> None:
        frac = min(max(self.step / max(self.total, 1), 0.0), 1.0)
        fill = int(self.WIDTH * frac)
        bar = "#" * fill + "-" * (self.WIDTH - fill)
        line = f"{frac * 100:3.0f}% [{bar}] {self.status_text(now)}"
        cols = self._columns()
        if cols > 10 and len(line) > cols - 1:
            line = line[: cols - 4] + "..."  # a wrapped line could not be redrawn in place
        self.stream.write("\r\033[K" + line)
        self.stream.flush()
        self._bar_shown = True
        self._last_draw = now

    def _clear_bar(self) -> None:
        if self._bar_shown:
            self.stream.write("\r\033[K")
            self._bar_shown = False


def _fmt(seconds: float) -> str:
    seconds = int(max(0, round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h >= 48:
        return f"{h // 24}d{h % 24:02d}h"
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
