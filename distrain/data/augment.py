"""Batch-wise image ops that run on the device: random crop with padding, horizontal flip, resize, normalise.

Random parameters are drawn per image from ``(seed, epoch)`` for the whole split at the start of an
epoch and looked up by dataset index, so an image's augmentation does not depend on the world size,
the batch it lands in, the worker that loaded it, or where a resumed run picked up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distrain.data.sampling import derived_seed

PAD = 4


@dataclass
class CropFlipParams:
    dx: torch.Tensor  # (N,) int64 in [0, 2*PAD]
    dy: torch.Tensor
    flip: torch.Tensor  # (N,) bool

    @classmethod
    def draw(cls, n: int, seed: int, epoch: int, pad: int = PAD) -> "CropFlipParams":
        g = torch.Generator()
        g.manual_seed(derived_seed(seed, epoch, 0xA06))
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
        flip = torch.randint(0, 2, (n,), generator=g).bool()
        return cls(dx, dy, flip)

    def to(self, device) -> "CropFlipParams":
        return CropFlipParams(self.dx.to(device), self.dy.to(device), self.flip.to(device))

    def take(self, idx: torch.Tensor) -> "CropFlipParams":
        return CropFlipParams(self.dx[idx], self.dy[idx], self.flip[idx])


def crop_flip(x: torch.Tensor, p: CropFlipParams, pad: int = PAD) -> torch.Tensor:
    """Random crop of the zero-padded image (torchvision's RandomCrop(size, padding=pad)) then flip.

    One gather does both: row/column index grids per image, columns reversed for flipped images.
    """
    n, c, h, w = x.shape
    if n == 0:
        return x
    xp = F.pad(x, (pad, pad, pad, pad))
    dev = x.device
    rows = p.dy.to(dev)[:, None] + torch.arange(h, device=dev)  # (n, h)
    cols = p.dx.to(dev)[:, None] + torch.arange(w, device=dev)  # (n, w)
    cols = torch.where(p.flip.to(dev)[:, None], cols.flip(1), cols)
    ni = torch.arange(n, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return xp[ni, ci, rows[:, None, :, None], cols[:, None, None, :]]


class Normalizer:
    """uint8 NCHW -> float, resized to the model's input and normalised, on the batch's device."""

    def __init__(self, mean, std, input_size: int, device, channels_last: bool = False):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0
        self.input_size = input_size
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            # Upsampling on the device (e.g. 32 -> 224 for VGG): bilinear with antialias off, as
            # torchvision's tensor Resize would do for upscaling.
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
