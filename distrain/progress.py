"""Console progress on the main process: a live bar on a terminal, plain lines on a pipe or in CI."""

from __future__ import annotations

import os
import sys
import time


class Progress:
    def __init__(self, enabled: bool, mode: str = "auto", stream=None):
        self.stream = stream or sys.stderr
        if mode == "auto":
            tty = hasattr(self.stream, "isatty") and self.stream.isatty()
            mode = "bar" if tty and not os.environ.get("CI") else "lines"
        self.enabled = enabled and mode != "none"
        self.mode = mode
        self.epoch = 0
        self.total = 0
        self.t0 = time.time()
        self._bar_shown = False

    def write(self, msg: str) -> None:
        """A log line; it never tears a live bar."""
        if not self.enabled:
            return
        if self._bar_shown:
            self.stream.write("\r\033[K")
            self._bar_shown = False
        self.stream.write(msg + "\n")
        self.stream.flush()

    def start_epoch(self, epoch: int, total_steps: int, done: int = 0) -> None:
        self.epoch, self.total, self.first = epoch, total_steps, done
        self.t0 = time.time()

    def update(self, step: int, loss: float, img_per_s: float, lr: float) -> None:
        if not self.enabled:
            return
        elapsed = time.time() - self.t0
        done = max(step - self.first, 1)
        eta = elapsed / done * (self.total - step)
        text = (f"epoch {self.epoch} step {step}/{self.total} loss {loss:.4f} lr {lr:.3g} "
                f"{img_per_s:,.0f} img/s eta {_fmt(eta)}")
        if self.mode == "bar":
            width = 24
            fill = int(width * step / max(self.total, 1))
            self.stream.write("\r\033[K[" + "#" * fill + "." * (width - fill) + "] " + text)
            self._bar_shown = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def end_epoch(self) -> None:
        if self.enabled and self._bar_shown:
            self.stream.write("\n")
            self._bar_shown = False

    def close(self) -> None:
        self.end_epoch()


def _fmt(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
