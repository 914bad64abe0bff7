"""The checks between optimizer steps, amortised: a stop request, a diverged loss, a data error.

Agreeing on them is a collective, so it runs every `every` steps, not every step: `every` is chosen
from the measured step time (agreed across ranks, so every rank polls at the same steps) so that a stop
request is still acted on within about `target_s` seconds. The trainer forces a poll at the steps
where it logs, checkpoints or ends an epoch, and those numbers ride on the same reduction.

Invariants:
- Every rank polls at the same optimizer steps and gets the same verdict (one all-reduce of a small
  vector), so all stop, diverge or fail together.
- A non-finite loss anywhere since the last poll is seen at the poll (NaN/inf propagate into the
  interval's sum), before any checkpoint or export of that state is written.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

MAX_EVERY = 100


@dataclass
class Verdict:
    stop: bool
    diverged: bool
    data_error: bool
    sums: list[float]  # the caller's extra values, summed over ranks


class StepChecks:
    def __init__(self, strategy, signals=None, target_s: float = 1.0):
        self.strategy, self.signals, self.target_s = strategy, signals, target_s
        self.every = 1
        self._since = 0
        self._t0 = time.perf_counter()
        self.data_error = None  # a UserError met by this rank's input pipeline

    def step_done(self, forced: bool) -> bool:
        """Count a finished optimizer step; True when this step must be followed by a poll."""
        self._since += 1
        return forced or self._since >= self.every

    def poll(self, loss: float, extra: list[float]) -> Verdict:
        """One collective: stop flag, step time, finiteness of this rank's ``loss`` since the last
        poll, data errors, and the caller's ``extra`` values (summed)."""
        elapsed = time.perf_counter() - self._t0
        stop = self.signals is not None and self.signals.requested
        vec = [1.0 if stop else 0.0, elapsed / max(self._since, 1),
               0.0 if math.isfinite(loss) else 1.0, 1.0 if self.data_error else 0.0, *extra]
        out = self.strategy.sum(vec)
        world = self.strategy.world
        step_s = out[1] / world
        self.every = max(1, min(MAX_EVERY, int(self.target_s / step_s))) if step_s > 0 else 1
        self._since, self._t0 = 0, time.perf_counter()
        return Verdict(stop=out[0] > 0, diverged=out[2] > 0, data_error=out[3] > 0, sums=out[4:])

    def reset_clock(self) -> None:
        """After work between steps that is not a step (evaluation, a checkpoint)."""
        self._since, self._t0 = 0, time.perf_counter()

    def raise_data_error(self) -> None:
        """Every rank raises the first failing rank's data error (collective)."""
        err: Optional[Exception] = self.data_error

        def report():
            if err is not None:
                raise err

        self.strategy.agree("read the training data", report)
