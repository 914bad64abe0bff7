"""Synthetic CIFAR-10 stand-in: sizes, determinism, prefix property and learnability."""

from __future__ import annotations

import numpy as np
import pytest

from distrain.data import cifar10
from distrain.data.synthetic import MEAN, STD, TEST_SIZE, TRAIN_SIZE, make_synthetic
from distrain.errors import UserError


def test_full_splits_have_cifar_sizes() -> None:
    x, y, classes = make_synthetic(train=True, seed=0)
    assert x.shape == (TRAIN_SIZE, 3, 32, 32) == (50_000, 3, 32, 32) and x.dtype == np.uint8
    assert x.flags.c_contiguous
    assert y.shape == (50_000,) and y.dtype == np.int64
    assert classes == cifar10.CLASSES
    np.testing.assert_array_equal(np.bincount(y, minlength=10), np.full(10, 5000))
    xt, yt, _ = make_synthetic(train=False, seed=0)
    assert xt.shape == (TEST_SIZE, 3, 32, 32) == (10_000, 3, 32, 32) and yt.shape == (10_000,)


def test_statistics_close_to_cifar() -> None:
    assert MEAN == cifar10.MEAN and STD == cifar10.STD
    x, _, _ = make_synthetic(train=True, seed=3, max_samples=5000)
    px = x.transpose(1, 0, 2, 3).reshape(3, -1).astype(np.float64) / 255.0
    np.testing.assert_allclose(px.mean(1), MEAN, atol=0.02)
    np.testing.assert_allclose(px.std(1), STD, atol=0.03)


def test_same_seed_same_data_different_seed_different() -> None:
    a = make_synthetic(train=True, seed=7, max_samples=3000)
    b = make_synthetic(train=True, seed=7, max_samples=3000)
    c = make_synthetic(train=True, seed=8, max_samples=3000)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[1], c[1])


def test_train_and_test_are_different_streams() -> None:
    tr, _, _ = make_synthetic(train=True, seed=1, max_samples=2000)
    te, _, _ = make_synthetic(train=False, seed=1, max_samples=2000)
    assert not np.array_equal(tr, te)
    # No test image is a copy of a train image.
    tr_rows = {r.tobytes() for r in tr.reshape(len(tr), -1)}
    assert not any(r.tobytes() in tr_rows for r in te.reshape(len(te), -1))


@pytest.mark.parametrize("train", [True, False])
def test_first_images_do_not_depend_on_max_samples(train: bool) -> None:
    full_x, full_y, _ = make_synthetic(train=train, seed=5, max_samples=2600)
    for n in (1, 17, 999, 1000, 1001, 2500, 2600):
        x, y, _ = make_synthetic(train=train, seed=5, max_samples=n)
        assert x.shape == (n, 3, 32, 32) and y.shape == (n,)
        np.testing.assert_array_equal(x, full_x[:n])
        np.testing.assert_array_equal(y, full_y[:n])


def test_max_samples_larger_than_split() -> None:
    x, y, _ = make_synthetic(train=False, seed=0, max_samples=10**9)
    assert len(x) == len(y) == 10_000


def test_learnable_by_nearest_class_mean() -> None:
    x, y, _ = make_synthetic(train=True, seed=11, max_samples=5000)
    xt, yt, _ = make_synthetic(train=False, seed=11, max_samples=2000)
    feats = x.reshape(len(x), -1).astype(np.float32)
    test = xt.reshape(len(xt), -1).astype(np.float32)
    means = np.stack([feats[y == k].mean(0) for k in range(10)])
    dist = -2.0 * test @ means.T + (means**2).sum(1)  # squared distance up to a per-row constant
    acc = float((dist.argmin(1) == yt).mean())
    assert acc > 0.5


@pytest.mark.parametrize("k", [1, 2, 3, 100])
def test_other_class_counts(k: int) -> None:
    x, y, classes = make_synthetic(train=True, seed=0, num_classes=k, max_samples=1200)
    assert classes == [f"class{i}" for i in range(k)]
    assert y.min() >= 0 and y.max() < k
    assert len(np.unique(y)) == min(k, 1200)
    assert x.shape == (1200, 3, 32, 32)


def test_large_or_negative_seeds() -> None:
    a = make_synthetic(train=True, seed=2**40 + 3, max_samples=10)[0]
    b = make_synthetic(train=True, seed=-1, max_samples=10)[0]
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"max_samples": 0}, {"max_samples": -5}])
def test_bad_arguments(kwargs) -> None:
    with pytest.raises(UserError):
        make_synthetic(train=True, seed=0, **kwargs)
