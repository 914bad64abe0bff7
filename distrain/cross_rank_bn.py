"""BatchNorm over all ranks' micro-batches on CPU processes (torch's SyncBatchNorm: GPUs only).

`CrossRankBatchNorm` computes, in training mode, the per-channel sum, sum of squares and count of
its input, sums them over the ranks with the ``reduce_sum`` callable it is given (the distribution
layer's all-reduce), and normalises with the global mean and (biased) variance; running statistics
are updated with the global unbiased variance, as torch's BatchNorm does. The sum is
differentiable: its backward sums the gradients of the global statistics over the ranks again, so
that after DDP averages the parameter gradients they equal those of one process running the whole
batch through plain BatchNorm.

Invariants: the module has BatchNorm's parameters, buffers and state_dict keys (checkpoints and
exports do not change); outside training mode it is plain BatchNorm with the running statistics; it
imports no distribution library (the all-reduce arrives as a callable) and every rank must call it
in the same order, as for any collective.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

ReduceSum = Callable[[torch.Tensor], torch.Tensor]


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, reduce_sum: ReduceSum) -> torch.Tensor:
        ctx.reduce_sum = reduce_sum
        return reduce_sum(x.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.reduce_sum(grad.contiguous().clone()), None


class CrossRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm{1,2,3}d whose training statistics are those of the batch over all ranks."""

    def __init__(self, num_features: int, reduce_sum: ReduceSum, **kwargs):
        super().__init__(num_features, **kwargs)
        self.reduce_sum = reduce_sum

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:  # plain BatchNorm with the running statistics
            return super().forward(x)
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        count = torch.full((1,), x.numel() / c, dtype=torch.float32, device=x.device)
        stats = _SumOverRanks.apply(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]),
                                    self.reduce_sum)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), n.detach())
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * n / (n - 1).clamp_min(1)
        self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
        self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)


def convert(module: nn.Module, reduce_sum: ReduceSum) -> nn.Module:
    """Every BatchNorm layer of ``module`` as a CrossRankBatchNorm with the same values (in place
    for children; returns the replacement when ``module`` itself is a BatchNorm)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, (CrossRankBatchNorm, nn.SyncBatchNorm)):
        new = CrossRankBatchNorm(module.num_features, reduce_sum, eps=module.eps,
                                 momentum=module.momentum, affine=module.affine,
                                 track_running_stats=module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        if module.affine:
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        return new
    for name, child in module.named_children():
        converted = convert(child, reduce_sum)
        if converted is not child:
            setattr(module, name, converted)
    return module
