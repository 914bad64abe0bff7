"""Input pipeline: epoch plans, on-device crop + flip, device vs DataLoader paths, the decoded-split cache."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from distrain.config import load_config
from distrain.data import cache, cifar10
from distrain.data.augment import PAD, CropFlipParams, PaddedStore, crop_flip
from distrain.data.pipeline import InputPipeline, PipelineSpec, Split
from distrain.build import pipeline_spec, split_of
from distrain.data.sampling import EpochPlan, epoch_permutation
from fakes import write_fake_cifar10

# (n, batch per rank, world size, grad_accum_steps): even, uneven tails, more ranks than a tail holds.
PLANS = [(64, 8, 1, 1), (100, 8, 2, 1), (101, 7, 3, 2), (10, 4, 4, 3), (5, 2, 4, 1), (257, 16, 2, 4), (1, 1, 2, 1)]


# ------------------------------------------------------------------------------------------------
# EpochPlan


@pytest.mark.parametrize("n,batch,world,accum", PLANS)
def test_plan_uses_every_image_exactly_once(n, batch, world, accum) -> None:
    plans = [EpochPlan(n, batch, world, r, accum, seed=3, epoch=1) for r in range(world)]
    nm = plans[0].num_micro_batches
    assert all(p.num_micro_batches == nm for p in plans)  # every rank runs the same number (DDP lockstep)
    used = torch.cat([p.micro_indices(m) for p in plans for m in range(nm)])
    assert sorted(used.tolist()) == list(range(n))
    # Steps: every micro-batch in exactly one step; step_samples is the step's images over all ranks.
    p0 = plans[0]
    micro = [m for s in range(p0.num_steps) for m in p0.micro_batches_of_step(s)]
    assert micro == list(range(nm))
    for s in range(p0.num_steps):
        assert p0.step_samples(s) == sum(len(p.micro_indices(m)) for p in plans for m in p.micro_batches_of_step(s))
    assert sum(p0.step_samples(s) for s in range(p0.num_steps)) == n
    for p in plans:
        assert p.rank_samples_before(p.num_steps) == sum(len(p.micro_indices(m)) for m in range(nm))


def test_order_depends_only_on_seed_and_epoch() -> None:
    a = EpochPlan(200, 8, 2, 1, 1, seed=5, epoch=3)
    b = EpochPlan(200, 8, 2, 1, 1, seed=5, epoch=3)
    assert all(torch.equal(a.micro_indices(m), b.micro_indices(m)) for m in range(a.num_micro_batches))
    assert torch.equal(epoch_permutation(200, 5, 3), epoch_permutation(200, 5, 3))
    assert not torch.equal(epoch_permutation(200, 5, 3), epoch_permutation(200, 5, 4))
    assert not torch.equal(epoch_permutation(200, 5, 3), epoch_permutation(200, 6, 3))
    # Whatever the batch size and world size, the global order is the epoch's permutation.
    for batch, world in [(1, 1), (16, 1), (8, 2), (3, 5)]:
        plans = [EpochPlan(200, batch, world, r, 1, seed=5, epoch=3) for r in range(world)]
        glob = []
        for m in range(plans[0].num_micro_batches):
            chunk = [None] * sum(len(p.micro_indices(m)) for p in plans)
            for r, p in enumerate(plans):
                chunk[r::world] = p.micro_indices(m).tolist()
            glob += chunk
        assert glob == epoch_permutation(200, 5, 3).tolist()


@pytest.mark.parametrize("n", [96, 100, 37])
def test_global_micro_batch_union_does_not_depend_on_world_size(n) -> None:
    global_batch = 12
    ref = None
    for world in (1, 2, 3, 4, 6):
        plans = [EpochPlan(n, global_batch // world, world, r, 2, seed=1, epoch=0) for r in range(world)]
        unions = [sorted(torch.cat([p.micro_indices(m) for p in plans]).tolist())
                  for m in range(plans[0].num_micro_batches)]
        steps = [plans[0].step_samples(s) for s in range(plans[0].num_steps)]
        if ref is None:
            ref = (unions, steps)
        assert (unions, steps) == ref, world


@pytest.mark.parametrize("world", [1, 2, 4])
def test_shards_match_distributed_sampler(world) -> None:
    n, batch = 96, 4  # divisible: DistributedSampler neither pads nor drops
    for rank in range(world):
        p = EpochPlan(n, batch, world, rank, 1, seed=7, epoch=2)
        ours = torch.cat([p.micro_indices(m) for m in range(p.num_micro_batches)]).tolist()
        ds = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=7)
        ds.set_epoch(2)
        assert ours == list(ds)


# ------------------------------------------------------------------------------------------------
# Crop + flip


def _reference(img: torch.Tensor, dx: int, dy: int, flip: bool, pad: int = PAD) -> torch.Tensor:
    """torchvision: RandomCrop(size, padding=pad) at (top=dy, left=dx), then horizontal flip."""
    from torchvision.transforms.v2 import functional as TF

    h, w = img.shape[-2:]
    out = TF.crop(TF.pad(img, [pad], fill=0), top=dy, left=dx, height=h, width=w)
    return TF.horizontal_flip(out) if flip else out


@pytest.mark.parametrize("shape,dtype", [((3, 32, 32), torch.uint8), ((1, 9, 13), torch.uint8), ((3, 8, 8), torch.float32)])
def test_crop_flip_matches_torchvision(shape, dtype) -> None:
    g = torch.Generator().manual_seed(0)
    n = 20
    x = torch.randint(0, 256, (n, *shape), generator=g).to(dtype)
    p = CropFlipParams.draw(n, seed=1, epoch=0)
    # Every corner case: no shift, full shift both ways, flipped and not.
    p.dx[:4], p.dy[:4], p.flip[:4] = torch.tensor([0, 8, 0, 8]), torch.tensor([0, 0, 8, 8]), torch.tensor([0, 1, 1, 0]).bool()
    out = crop_flip(x, p)
    assert out.shape == x.shape and out.dtype == dtype
    for i in range(n):
        ref = _reference(x[i], int(p.dx[i]), int(p.dy[i]), bool(p.flip[i]))
        assert torch.equal(out[i], ref), i


def test_padded_store_gathers_crops_and_flips_by_index() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (50, 3, 32, 32), generator=g, dtype=torch.uint8)
    params = CropFlipParams.draw(50, seed=2, epoch=5)
    store = PaddedStore(x)
    idx = torch.tensor([49, 0, 7, 7, 23])  # any order, repeats allowed
    out = store.crop_flip(idx, params.take(idx))
    for j, i in enumerate(idx.tolist()):
        assert torch.equal(out[j], _reference(x[i], int(params.dx[i]), int(params.dy[i]), bool(params.flip[i])))
    assert store.crop_flip(idx[:0], params.take(idx[:0])).shape == (0, 3, 32, 32)


def test_augmented_device_pipeline_holds_one_padded_copy_of_the_split() -> None:
    split = _split(40)
    original = split.images.clone()
    spec = PipelineSpec(batch_size=8, seed=0, augment=True, input_size=32, loader="device")
    pipe = InputPipeline(split, spec, torch.device("cpu"), 0, 1, train=True)
    store = pipe.store.store
    assert store.shape == (40, 3, 32 + 2 * PAD, 32 + 2 * PAD)  # padded once, no mirrored copy
    # The split and the pipeline see the unpadded images inside the store: no second copy is kept.
    for images in (split.images, pipe.images):
        assert torch.equal(images, original)
        assert images.untyped_storage().data_ptr() == store.untyped_storage().data_ptr()


def test_crop_params_depend_on_seed_and_epoch_only() -> None:
    a, b = CropFlipParams.draw(100, 3, 1), CropFlipParams.draw(100, 3, 1)
    assert torch.equal(a.dx, b.dx) and torch.equal(a.dy, b.dy) and torch.equal(a.flip, b.flip)
    c = CropFlipParams.draw(100, 3, 2)
    assert not torch.equal(a.dx, c.dx)
    assert int(a.dx.min()) >= 0 and int(a.dx.max()) <= 2 * PAD and 0.3 < a.flip.float().mean() < 0.7


# ------------------------------------------------------------------------------------------------
# Device path vs DataLoader path


def _split(n: int = 90) -> Split:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return Split(torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)], images=images, source="test")


def _batches(loader: str, augment: bool, split: Split, rank: int, world: int, epoch: int = 1, start_micro: int = 0,
             workers: int = 0, train: bool = True) -> list:
    cfg = load_config(None, [f"data.loader={loader}", f"data.augment={str(augment).lower()}", "train.batch_size=8",
                             "train.grad_accum_steps=2", "train.seed=4", f"data.num_workers={workers}"])
    pipe = InputPipeline(split, pipeline_spec(cfg, 8 if train else 16), torch.device("cpu"), rank, world,
                         train=train)
    assert pipe.mode == loader
    if train:
        pipe.set_epoch(EpochPlan(len(split), 8, world, rank, 2, seed=4, epoch=epoch), start_micro=start_micro)
    return list(pipe)


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("world", [1, 3])
def test_device_and_dataloader_paths_give_the_same_batches(augment, world) -> None:
    split = _split()
    for rank in range(world):
        dev = _batches("device", augment, split, rank, world)
        dl = _batches("dataloader", augment, split, rank, world)
        assert len(dev) == len(dl) == EpochPlan(len(split), 8, world, rank, 2, 4, 1).num_micro_batches
        for (x1, y1, i1), (x2, y2, i2) in zip(dev, dl):
            assert torch.equal(i1, i2) and torch.equal(y1, y2)
            assert x1.dtype == torch.float32 and torch.equal(x1, x2)


def test_dataloader_workers_give_the_same_batches() -> None:
    split = _split(40)
    for (x1, y1, i1), (x2, y2, i2) in zip(_batches("device", True, split, 0, 2), _batches("dataloader", True, split, 0, 2, workers=1)):
        assert torch.equal(i1, i2) and torch.equal(y1, y2) and torch.equal(x1, x2)


def test_unaugmented_batches_are_the_normalised_images() -> None:
    split = _split()
    mean = torch.tensor(cifar10.MEAN).view(1, 3, 1, 1)
    std = torch.tensor(cifar10.STD).view(1, 3, 1, 1)
    for x, y, idx in _batches("device", False, split, 0, 1):
        ref = (split.images[idx].float() / 255 - mean) / std
        assert torch.allclose(x, ref, atol=1e-5) and torch.equal(y, split.labels[idx])


def test_augmentation_follows_the_image_not_the_batch() -> None:
    """An image gets the same crop and flip whatever the world size or the batch it lands in."""
    split = _split()
    seen = {}
    for world in (1, 3):
        for rank in range(world):
            for x, _, idx in _batches("device", True, split, rank, world):
                for i, row in zip(idx.tolist(), x):
                    if i in seen:
                        assert torch.equal(seen[i], row)
                    seen[i] = row
    assert len(seen) == len(split)


def test_resume_mid_epoch_continues_the_same_batches() -> None:
    split = _split()
    full = _batches("device", True, split, 1, 2)
    tail = _batches("device", True, split, 1, 2, start_micro=3)
    assert len(tail) == len(full) - 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) for a, b in zip(full[3:], tail))


def test_eval_shards_cover_the_split_once_on_both_paths() -> None:
    split = _split(37)
    for loader in ("device", "dataloader"):
        got = torch.cat([idx for r in range(3) for _, _, idx in _batches(loader, True, split, r, 3, train=False)])
        assert sorted(got.tolist()) == list(range(37))


def test_empty_rank_share_has_the_right_shape() -> None:
    split = _split(5)  # 4 ranks x batch 8: ranks 1.. get little or nothing of the one global micro-batch
    for loader in ("device", "dataloader"):
        for rank in range(4):
            for x, y, idx in _batches(loader, True, split, rank, 4):
                assert x.shape[1:] == (3, 32, 32) and len(x) == len(y) == len(idx)


# ------------------------------------------------------------------------------------------------
# The decoded-split cache


@pytest.fixture
def cifar(tmp_path, monkeypatch):
    write_fake_cifar10(tmp_path, n_train=60, n_test=20, seed=0)
    monkeypatch.setattr(cache, "SETTLE_S", 0.05)
    monkeypatch.delenv("DISTRAIN_DATA_CACHE", raising=False)
    time.sleep(0.1)  # the files are older than SETTLE_S: cacheable
    return tmp_path


def _no_decode(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("decoded the batches although a valid cache exists")

    monkeypatch.setattr(cifar10, "load_cifar10", boom)


def _same(a, b) -> bool:
    return np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_cache_is_written_once_and_gives_the_same_split(cifar, monkeypatch) -> None:
    fresh = cifar10.load_cifar10(cifar, train=True, verify=False)
    first = cache.load_cifar10_cached(cifar, train=True, verify=False)
    assert os.path.isfile(cache.cache_path(cifar, True)) and _same(first, fresh)
    assert first[0].flags["C_CONTIGUOUS"] and first[0].dtype == np.uint8 and first[1].dtype == np.int64
    _no_decode(monkeypatch)
    assert _same(cache.load_cifar10_cached(cifar, train=True, verify=False), fresh)
    head = cache.load_cifar10_cached(cifar, train=True, verify=False, max_samples=25)  # sliced from the cache
    assert np.array_equal(head[0], fresh[0][:25]) and np.array_equal(head[1], fresh[1][:25])
    assert not os.path.exists(cache.cache_path(cifar, False))  # each split has its own


def test_cache_is_invalidated_when_a_file_changes(cifar) -> None:
    cache.load_cifar10_cached(cifar, train=True, verify=False)
    folder = cifar / cifar10.BASE_FOLDER
    other = write_fake_cifar10(cifar / "other", n_train=60, n_test=20, seed=9)  # same sizes, other contents
    (folder / "data_batch_3").write_bytes((other / "data_batch_3").read_bytes())  # rewritten in place
    expected = cifar10.load_cifar10(cifar, train=True, verify=False)
    assert _same(cache.load_cifar10_cached(cifar, train=True, verify=False), expected)
    # Replaced by another file with the same size and timestamps (a copy, a restore): a new inode.
    os.replace(other / "data_batch_5", folder / "data_batch_5")
    st = os.stat(folder / "data_batch_4")
    os.utime(folder / "data_batch_5", ns=(st.st_atime_ns, st.st_mtime_ns))
    expected = cifar10.load_cifar10(cifar, train=True, verify=False)
    assert _same(cache.load_cifar10_cached(cifar, train=True, verify=False), expected)


def test_a_missing_file_is_still_an_error_with_a_cache(cifar) -> None:
    from distrain.errors import UserError

    cache.load_cifar10_cached(cifar, train=True, verify=False)
    os.unlink(cifar / cifar10.BASE_FOLDER / "data_batch_2")
    with pytest.raises(UserError, match="data_batch_2"):
        cache.load_cifar10_cached(cifar, train=True, verify=False)


def test_unverified_cache_never_skips_the_md5_check(cifar) -> None:
    from distrain.errors import UserError

    cache.load_cifar10_cached(cifar, train=True, verify=False)
    with pytest.raises(UserError, match="MD5"):  # fake files: not the official sums
        cache.load_cifar10_cached(cifar, train=True, verify=True)


def test_verified_cache_skips_the_md5_check(cifar, monkeypatch) -> None:
    folder = cifar / cifar10.BASE_FOLDER
    sums = {name: cifar10.md5sum(str(folder / name)) for name in cifar10.CIFAR10_FILES}
    monkeypatch.setattr(cifar10, "CIFAR10_FILES", sums)
    first = cache.load_cifar10_cached(cifar, train=False, verify=True)
    monkeypatch.setattr(cifar10, "md5sum", lambda *a, **k: pytest.fail("MD5 computed on a cache hit"))
    assert _same(cache.load_cifar10_cached(cifar, train=False, verify=True), first)


def test_no_cache_from_partial_reads_fresh_files_or_when_off(cifar, monkeypatch) -> None:
    cache.load_cifar10_cached(cifar, train=True, verify=False, max_samples=10)
    assert not os.path.exists(cache.cache_path(cifar, True))
    with cache.read_only():
        cache.load_cifar10_cached(cifar, train=True, verify=False)
    monkeypatch.setenv("DISTRAIN_DATA_CACHE", "0")
    cache.load_cifar10_cached(cifar, train=True, verify=False)
    assert not os.path.exists(os.path.dirname(cache.cache_path(cifar, True)))
    monkeypatch.delenv("DISTRAIN_DATA_CACHE")
    monkeypatch.setattr(cache, "SETTLE_S", 3600.0)  # files just written: timestamps could still collide
    cache.load_cifar10_cached(cifar, train=True, verify=False)
    assert not os.path.exists(cache.cache_path(cifar, True))


def test_corrupt_cache_is_ignored_and_replaced(cifar) -> None:
    path = cache.cache_path(cifar, True)
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"not a safetensors file")
    expected = cifar10.load_cifar10(cifar, train=True, verify=False)
    assert _same(cache.load_cifar10_cached(cifar, train=True, verify=False), expected)
    assert cache.read_cache(cifar, True, verify=False) is not None
    assert [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")] == []


def test_load_split_uses_the_cache(cifar, monkeypatch) -> None:
    cfg = load_config(None, ["data.name=cifar10", f"data.root={cifar}", "data.verify=false"])
    first = split_of(cfg, train=True)
    _no_decode(monkeypatch)
    second = split_of(cfg, train=True)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert first.classes == second.classes
