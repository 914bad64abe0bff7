"""Where training is: the `TrainState` every checkpoint stores, and which of its fields are per rank.

Steps are optimizer steps. `epoch` and `step_in_epoch` say what comes next: a state at
``(epoch=2, step_in_epoch=0)`` has finished epoch 1 and nothing of epoch 2. The running totals are this
rank's own sums over the current epoch, so a resumed epoch still reports whole-epoch numbers once the
ranks' totals are summed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional

PER_RANK_FIELDS = ("epoch_loss_sum", "epoch_correct", "epoch_samples")


@dataclass
class TrainState:
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in `epoch`
    global_step: int = 0
    best_accuracy: Optional[float] = None
    best_step: Optional[int] = None
    epoch_loss_sum: float = 0.0
    epoch_correct: int = 0
    epoch_samples: int = 0
    finished: bool = False

    def next_epoch(self) -> None:
        """The epoch rollover, written once: the next epoch starts with empty running totals."""
        self.epoch += 1
        self.step_in_epoch = 0
        self.reset_totals()

    def reset_totals(self) -> None:
        self.epoch_loss_sum, self.epoch_correct, self.epoch_samples = 0.0, 0, 0

    def shared(self) -> dict:
        """The fields every rank has alike (state.json); per-rank totals go to the rank files."""
        return {k: v for k, v in asdict(self).items() if k not in PER_RANK_FIELDS}

    def per_rank(self) -> dict:
        return {k: getattr(self, k) for k in PER_RANK_FIELDS}

    @classmethod
    def from_record(cls, record: dict) -> "TrainState":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in known})
