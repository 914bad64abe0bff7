"""Which images each rank sees, and when: the epoch plan behind every correctness promise.

Training order: one permutation of the split per epoch from ``(seed, epoch)`` alone (the generator
torch's DistributedSampler uses), cut into global micro-batches of ``batch_size * world_size`` images;
rank ``r`` takes positions ``r, r + W, ...`` of each global micro-batch, which for full batches is
exactly DistributedSampler's interleaved shard. Unlike DistributedSampler, nothing is padded or
dropped: the last global micro-batch is split as it falls, so every image is used exactly once per
epoch and every rank runs the same number of micro-batches (a rank may get an empty one, which keeps
DDP's collectives in lockstep). ``grad_accum_steps`` micro-batches make an optimizer step; the last
step of an epoch may have fewer.

Because the union over ranks of one global micro-batch does not depend on the world size, W processes
with ``batch_size = B / W`` use the same images per optimizer step as one process with ``B``.

Evaluation: rank ``r`` takes images ``r, r + W, ...`` of the split, unpadded, so summing counts over
ranks counts every test image exactly once whatever the world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of epoch ``epoch``: a function of ``(seed, epoch)`` alone."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)  # what torch.utils.data.DistributedSampler does
    return torch.randperm(n, generator=g)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions (unlike hash())."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


@dataclass(frozen=True)
class EpochPlan:
    n: int
    batch_size: int  # per rank
    world_size: int
    rank: int
    grad_accum_steps: int
    seed: int
    epoch: int
    shuffle: bool = True

    def __post_init__(self):
        order = epoch_permutation(self.n, self.seed, self.epoch) if self.shuffle else torch.arange(self.n)
        object.__setattr__(self, "order", order)

    @property
    def global_micro_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def num_micro_batches(self) -> int:
        return math.ceil(self.n / self.global_micro_batch)

    @property
    def num_steps(self) -> int:
        """Optimizer steps in this epoch."""
        return math.ceil(self.num_micro_batches / self.grad_accum_steps)

    def micro_batches_of_step(self, step: int) -> range:
        first = step * self.grad_accum_steps
        return range(first, min(first + self.grad_accum_steps, self.num_micro_batches))

    def step_samples(self, step: int) -> int:
        """Images in optimizer step ``step`` summed over all ranks (known on every rank, no communication)."""
        g = self.global_micro_batch * self.grad_accum_steps
        return min(self.n, (step + 1) * g) - step * g

    def micro_indices(self, micro: int) -> torch.Tensor:
        """This rank's dataset indices for global micro-batch ``micro`` (possibly empty)."""
        b = self.global_micro_batch
        chunk = self.order[micro * b : (micro + 1) * b]
        return chunk[self.rank :: self.world_size]

    def rank_samples_before(self, step: int) -> int:
        """Images this rank used in steps ``[0, step)`` (for resuming an epoch's running totals)."""
        return sum(len(self.micro_indices(m)) for s in range(step) for m in self.micro_batches_of_step(s))


def eval_shard(n: int, world_size: int, rank: int) -> torch.Tensor:
    """This rank's test indices: every image exactly once over all ranks, nothing padded."""
    return torch.arange(rank, n, world_size)


class PlanBatchSampler(torch.utils.data.Sampler):
    """Feeds a DataLoader the micro-batches of an EpochPlan, from a given micro-batch on (for resume).

    Items are ``(epoch, index)`` pairs: persistent workers hold their own copy of the dataset, so the
    epoch (which seeds per-image augmentation) must travel with each index.
    """

    def __init__(self, plan: EpochPlan | None = None, start_micro: int = 0):
        self.plan = plan
        self.start_micro = start_micro

    def set_plan(self, plan: EpochPlan, start_micro: int = 0) -> None:
        self.plan, self.start_micro = plan, start_micro

    def __iter__(self):
        for m in range(self.start_micro, self.plan.num_micro_batches):
            yield [(self.plan.epoch, i) for i in self.plan.micro_indices(m).tolist()]

    def __len__(self) -> int:
        return self.plan.num_micro_batches - self.start_micro


class IndexBatchSampler(torch.utils.data.Sampler):
    """Fixed batches over a fixed index list (evaluation shards)."""

    def __init__(self, indices: torch.Tensor, batch_size: int):
        self.indices, self.batch_size = indices, batch_size

    def __iter__(self):
        for i in range(0, len(self.indices), self.batch_size):
            yield self.indices[i : i + self.batch_size].tolist()

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)
