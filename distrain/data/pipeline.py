"""Input pipelines: from a configured dataset to normalised device batches, by epoch plan.

Two paths give the same batches for the same ``(seed, epoch)`` when augmentation is off:

- ``device``: the whole uint8 split is copied to the device once; each micro-batch is a gather by
  index, augmented and normalised there. No worker processes, no per-step host-to-device image copy.
- ``dataloader``: a torch DataLoader fed by the same plan (pinned memory, non-blocking copies,
  persistent workers); used for image folders and splits that do not fit on the device.

Ranks and world size arrive as plain integers: this module knows nothing about process groups.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch

from distrain.config import Config
from distrain.data import cifar10, synthetic
from distrain.data.augment import CropFlipParams, Normalizer, PaddedStore, crop_flip
from distrain.data.cache import load_cifar10_cached
from distrain.data.sampling import EpochPlan, IndexBatchSampler, PlanBatchSampler, eval_shard
from distrain.errors import UserError
# IMAGENET_MEAN / IMAGENET_STD are re-exported for their old importers.
from distrain.model_specs import IMAGENET_MEAN, IMAGENET_STD, preprocessing  # noqa: F401



@dataclass
class Split:
    """One split of a dataset: in-memory uint8 images, or a Dataset that decodes files."""

    labels: torch.Tensor  # int64 (N,)
    classes: list[str]
    images: Optional[torch.Tensor] = None  # uint8 (N, 3, H, W)
    dataset: Optional[torch.utils.data.Dataset] = None  # yields (uint8 image, label, index)
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


def prepare_data(cfg: Config) -> None:
    """Fetch what is missing (main process only; the others wait for it)."""
    if cfg.data.name == "cifar10":
        cifar10.ensure_cifar10(cfg.data.root, download=cfg.data.download)
    elif cfg.data.name == "imagefolder" and cfg.data.verify:
        # Every file's header, before any rank starts: a bad file fails all ranks at once, not one rank mid-epoch.
        from distrain.data import imagefolder

        for split in ("train", "val"):
            imagefolder.check_readable(imagefolder.scan_imagefolder(cfg.data.root, split)[0])


def normalization(cfg: Config) -> tuple[tuple, tuple]:
    """The model's normalisation on this dataset (model_specs.preprocessing: the weights' own,
    or ImageNet statistics for photos, CIFAR-10's otherwise)."""
    mean, std, _, _ = preprocessing(cfg.model, cfg.data.name)
    return mean, std


def load_split(cfg: Config, train: bool) -> Split:
    d = cfg.data
    limit = d.max_train_samples if train else d.max_test_samples
    if d.name == "cifar10":
        # Decoded once and cached next to the data (invalidated when the files change): data/cache.py.
        images, labels, classes = load_cifar10_cached(d.root, train=train, verify=d.verify, max_samples=limit)
    elif d.name == "synthetic":
        images, labels, classes = synthetic.make_synthetic(
            train=train, seed=cfg.train.seed, num_classes=cfg.model.num_classes, max_samples=limit
        )
    elif d.name == "imagefolder":
        from distrain.data import imagefolder

        split = "train" if train else "val"
        paths, labels, classes = imagefolder.scan_imagefolder(d.root, split)
        if limit is not None:
            paths, labels = paths[:limit], labels[:limit]
        resize = preprocessing(cfg.model, d.name)[2]  # the eval resize of the model's weights
        ds = imagefolder.ImageFolderDataset(
            paths, labels, size=cfg.model.input_size, train=train, augment=d.augment and train,
            seed=cfg.train.seed, resize=resize,
        )
        return Split(torch.as_tensor(np.asarray(labels), dtype=torch.int64), list(classes), dataset=ds,
                     source=os.path.join(d.root, split))
    else:  # validated by config; kept for clarity
        raise UserError(f"config key 'data.name': unknown dataset '{d.name}'")
    if int(np.max(labels, initial=0)) >= cfg.model.num_classes:
        raise UserError(
            f"config key 'model.num_classes' is {cfg.model.num_classes} but the {d.name} data has labels up to "
            f"{int(np.max(labels))}; set model.num_classes={int(np.max(labels)) + 1}"
        )
    return Split(torch.from_numpy(np.ascontiguousarray(labels)).long(), list(classes),
                 images=torch.from_numpy(np.ascontiguousarray(images)), source=d.name)


def _worker_message(text: str) -> str:
    """The original one-line message of a UserError re-raised by a DataLoader worker."""
    marker = UserError.__module__ + "." + UserError.__name__ + ": "
    lines = [l for l in text.splitlines() if l.startswith(marker)]
    return lines[-1][len(marker):] if lines else text.splitlines()[0]


class _InMemory(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if isinstance(i, tuple):  # (epoch, index) from PlanBatchSampler; in-memory images are augmented later
            i = i[1]
        return self.images[i], self.labels[i], i


def default_num_workers(local_world_size: int = 1) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // max(1, local_world_size) - 1))


class InputPipeline:
    """Normalised device batches of one split, for one rank, following the epoch plan."""

    def __init__(self, split: Split, cfg: Config, device: torch.device, rank: int, world_size: int,
                 train: bool, local_world_size: int = 1, eval_batch_size: Optional[int] = None,
                 mean_std: Optional[tuple] = None):
        self.split, self.cfg, self.device = split, cfg, torch.device(device)
        self.rank, self.world_size, self.train = rank, world_size, train
        mean, std = mean_std or normalization(cfg)
        self.normalize = Normalizer(mean, std, cfg.model.input_size, self.device, cfg.model.channels_last)
        # Image folders are augmented while decoding (random resized crop); in-memory splits on the device.
        self.augment = train and cfg.data.augment and split.images is not None
        self.batch_size = cfg.train.batch_size if train else (eval_batch_size or cfg.train.batch_size)
        self.mode = self._choose_mode(cfg.data.loader)
        self.plan: Optional[EpochPlan] = None
        self.start_micro = 0
        self._params: Optional[CropFlipParams] = None
        self.store: Optional[PaddedStore] = None
        if self.mode == "device":
            # Copied once; every later batch is a gather on the device.
            self.images = split.images.to(self.device)
            self.labels = split.labels.to(self.device)
            if self.augment:  # padded and mirrored once: a batch's gather + crop + flip is one row gather
                self.store = PaddedStore(self.images)
        else:
            ds = split.dataset if split.dataset is not None else _InMemory(split.images, split.labels)
            workers = cfg.data.num_workers
            if workers is None:
                workers = 0 if split.images is not None else default_num_workers(local_world_size)
            self.sample_shape = (3, cfg.model.input_size, cfg.model.input_size) if split.images is None else tuple(split.images.shape[1:])
            self.batch_sampler = PlanBatchSampler() if train else IndexBatchSampler(eval_shard(len(split), world_size, rank), self.batch_size)
            self.loader = torch.utils.data.DataLoader(
                ds, batch_sampler=self.batch_sampler, num_workers=workers, collate_fn=self._collate,
                pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                prefetch_factor=4 if workers > 0 else None,
            )

    def _choose_mode(self, wanted: str) -> str:
        in_memory = self.split.images is not None
        if wanted == "device" and not in_memory:
            raise UserError("config key 'data.loader=device' needs an in-memory dataset (cifar10, synthetic); "
                            "image folders use data.loader=dataloader")
        if wanted == "auto":
            if not in_memory:
                return "dataloader"
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                # The split, plus its padded and mirrored store when augmenting (3.1x), plus batches.
                need = self.split.images.numel() * (5 if self.augment else 2)
                return "device" if need < free // 4 else "dataloader"
            return "device"
        return wanted

    def _collate(self, batch):
        if not batch:  # a rank's share of the last global batch can be empty
            return (torch.empty((0, *self.sample_shape), dtype=torch.uint8), torch.empty(0, dtype=torch.int64),
                    torch.empty(0, dtype=torch.int64))
        imgs, labels, idx = zip(*batch)
        return torch.stack(imgs), torch.as_tensor(labels, dtype=torch.int64), torch.as_tensor(idx, dtype=torch.int64)

    # -- training --------------------------------------------------------------------------------
    def set_epoch(self, plan: EpochPlan, start_micro: int = 0) -> None:
        """Start ``plan`` at micro-batch ``start_micro``; skipped batches are never read."""
        self.plan, self.start_micro = plan, start_micro
        if self.augment:
            self._params = CropFlipParams.draw(len(self.split), self.cfg.train.seed, plan.epoch)
            if self.mode == "device":
                self._params = self._params.to(self.device)
        if self.mode == "dataloader":
            self.batch_sampler.set_plan(plan, start_micro)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(normalised images, labels, dataset indices) on the device."""
        if self.mode == "device":
            if self.train:
                for m in range(self.start_micro, self.plan.num_micro_batches):
                    yield self._finish(*self._gather(self.plan.micro_indices(m)))
            else:
                shard = eval_shard(len(self.split), self.world_size, self.rank)
                for i in range(0, len(shard), self.batch_size):
                    yield self._finish(*self._gather(shard[i : i + self.batch_size]))
        else:
            nb = self.device.type == "cuda"
            try:
                for x, y, idx in self.loader:
                    yield self._finish(x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb), idx)
            except UserError as e:  # from a worker: the DataLoader wraps the message in the worker's traceback
                raise UserError(_worker_message(str(e))) from None

    def _gather(self, idx: torch.Tensor):
        idx_dev = idx.to(self.device, non_blocking=True)
        labels = torch.index_select(self.labels, 0, idx_dev)  # index_select: ~9x faster than [idx] on a CPU
        if self.store is not None:  # augmented here, in the same gather
            return self.store.crop_flip(idx_dev, self._params.take(idx_dev)), labels, idx
        return torch.index_select(self.images, 0, idx_dev), labels, idx

    def _finish(self, x, y, idx):
        if self.augment and self.store is None:
            x = crop_flip(x, self._params.take(idx.to(self._params.dx.device)))
        return self.normalize(x), y, idx
