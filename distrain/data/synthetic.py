"""A learnable stand-in for CIFAR-10 generated from a seed: same shapes, split sizes and statistics.

Each class has a smooth random colour template (a 4x4 grid per channel, bilinearly upsampled to
32x32). An image is ``base + c * template[label] + a * template[other class] + offset + noise`` with
per-image contrast ``c``, a distractor class mixed in with weight ``a``, a per-channel brightness
offset and pixel noise, so a nearest-class-mean classifier is well above chance but not perfect and
a small CNN has something to learn. Pixel mean/std roughly match CIFAR-10's ``MEAN``/``STD``.

Images are made in fixed chunks, each from its own stream seeded by ``(seed, split, chunk)``, so
image ``i`` does not depend on ``max_samples`` and only the chunks needed are generated.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

from distrain.data.cifar10 import CLASSES, MEAN, STD
from distrain.errors import UserError

__all__ = ["make_synthetic", "TRAIN_SIZE", "TEST_SIZE", "MEAN", "STD"]

TRAIN_SIZE = 50_000
TEST_SIZE = 10_000
CHUNK = 1000
_GRID = 4
_SIZE = 32
_TAG = 0x5EED_C1FA  # keeps these streams apart from any other user of the same seed
_TEMPLATE_STREAM, _TRAIN_STREAM, _TEST_STREAM = 0, 1, 2
# Pixel units, tuned so the pixel std is close to CIFAR-10's (~63) and nearest-class-mean gets ~88%.
_TEMPLATE_STD = 55.0
_NOISE = 64  # uniform in [-64, 63]
_OFFSET_STD = 20.0
_CONTRAST = (0.5, 1.1)
_MIX = (0.0, 0.8)


def _rng(seed: int, *stream: int) -> np.random.Generator:
    # SeedSequence needs non-negative entropy; masking keeps negative seeds usable and distinct.
    return np.random.default_rng(np.random.SeedSequence(int(seed) & ((1 << 64) - 1), spawn_key=(_TAG, *stream)))


def _upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Bilinear (align_corners=False) interpolation weights, shape (n_out, n_in)."""
    pos = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = pos - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] += 1 - w
    m[np.arange(n_out), hi] += w
    return m


def class_templates(seed: int, num_classes: int) -> np.ndarray:
    """(num_classes, 3, 32, 32) float32 zero-mean-ish colour patterns, shared by both splits."""
    grid = _rng(seed, _TEMPLATE_STREAM).standard_normal((num_classes, 3, _GRID, _GRID))
    up = _upsample_matrix(_GRID, _SIZE)
    t = np.einsum("hi,kcij,wj->kchw", up, grid, up)
    # Zero mean per channel over all classes keeps the pixel mean at CIFAR's whatever the seed.
    t -= t.mean(axis=(0, 2, 3), keepdims=True)
    t /= t.std() + 1e-8
    return (t * _TEMPLATE_STD).astype(np.float32)


def _chunk(seed: int, stream: int, index: int, count: int, templates: np.ndarray, base: np.ndarray):
    rng = _rng(seed, stream, index)
    k = len(templates)
    labels = rng.permutation(np.arange(count) % k).astype(np.int64)  # balanced within a chunk
    other = (labels + rng.integers(1, k, size=count)) % k if k > 1 else labels
    contrast = rng.uniform(*_CONTRAST, size=(count, 1, 1, 1)).astype(np.float32)
    mix = rng.uniform(*_MIX, size=(count, 1, 1, 1)).astype(np.float32)
    offset = rng.normal(0.0, _OFFSET_STD, size=(count, 3, 1, 1)).astype(np.float32)
    # Random bytes are the cheapest noise source; halved and shifted they are uniform in [-64, 63].
    noise = np.frombuffer(rng.bytes(count * 3 * _SIZE * _SIZE), dtype=np.uint8).reshape(count, 3, _SIZE, _SIZE)
    x = templates[labels] * contrast
    x += templates[other] * mix
    x += base + offset - _NOISE
    x += noise >> 1
    np.clip(x, 0, 255, out=x)
    return x.astype(np.uint8), labels


def class_names(num_classes: int) -> list[str]:
    return list(CLASSES) if num_classes == len(CLASSES) else [f"class{i}" for i in range(num_classes)]


def make_synthetic(
    train: bool, seed: int, num_classes: int = 10, max_samples: Optional[int] = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 images (N, 3, 32, 32), int64 labels (N,), class names), N = 50,000 train / 10,000 test.

    Deterministic in ``seed``; train and test come from different streams of it but share the
    class templates. The first ``max_samples`` images are the same whatever ``max_samples`` is.
    """
    if isinstance(num_classes, bool) or int(num_classes) < 1:
        raise UserError(f"synthetic data needs num_classes >= 1, got {num_classes!r}; set model.num_classes")
    if max_samples is not None and (isinstance(max_samples, bool) or int(max_samples) < 1):
        raise UserError(f"synthetic data max_samples must be a positive integer or null, got {max_samples!r}")
    num_classes = int(num_classes)
    n = TRAIN_SIZE if train else TEST_SIZE
    if max_samples is not None:
        n = min(n, int(max_samples))
    stream = _TRAIN_STREAM if train else _TEST_STREAM
    templates = class_templates(seed, num_classes)
    base = (np.asarray(MEAN, dtype=np.float32) * 255.0).reshape(1, 3, 1, 1)

    images = np.empty((n, 3, _SIZE, _SIZE), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)

    def fill(c: int) -> None:
        start = c * CHUNK
        # Always the full chunk, then truncated: image i must not depend on max_samples.
        x, y = _chunk(seed, stream, c, CHUNK, templates, base)
        stop = min(start + CHUNK, n)
        images[start:stop] = x[: stop - start]
        labels[start:stop] = y[: stop - start]

    chunks = range((n + CHUNK - 1) // CHUNK)
    workers = min(len(chunks), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if workers > 1:
        # numpy releases the GIL in the heavy loops, so threads use every core.
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fill, chunks))
    else:
        for c in chunks:
            fill(c)
    return images, labels, class_names(num_classes)
