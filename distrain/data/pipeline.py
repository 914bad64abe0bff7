"""Input pipelines: from a configured dataset to normalised device batches, by epoch plan.

Two paths give the same batches for the same ``(seed, epoch)`` when augmentation is off:

- ``device``: the whole uint8 split is copied to the device once; each micro-batch is a gather by
  index, augmented and normalised there. No worker processes, no per-step host-to-device image copy.
- ``dataloader``: a torch DataLoader fed by the same plan (pinned memory, non-blocking copies,
  persistent workers); used for image folders and splits that do not fit on the device.

Ranks and world size arrive as plain integers: this module knows nothing about process groups. Nor
does it read the run's whole config: it gets the ``data`` section (`DataConfig`) and a frozen
`PipelineSpec` that the caller decides once (batch size, seed, augmentation, input size, memory
format, normalisation, loader), so every knob that reaches a pipeline is visible where it is built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, Literal, Optional

import numpy as np
import torch

from distrain.config import Config, DataConfig
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


@dataclass(frozen=True)
class PipelineSpec:
    """What one input pipeline does besides reading its split; decided once, by the caller."""

    batch_size: int  # micro-batch size (training) or evaluation batch size
    seed: int  # augmentation parameters are drawn from (seed, epoch)
    augment: bool  # crop + flip of in-memory training splits (image folders augment in decoding)
    input_size: int  # side of the network input; batches are resized on the device when it differs
    mean: tuple = cifar10.MEAN
    std: tuple = cifar10.STD
    channels_last: bool = False
    loader: Literal["auto", "device", "dataloader"] = "auto"
    num_workers: Optional[int] = None  # DataLoader workers; None: 0 in memory, else by cores


def prepare_data(data: DataConfig) -> None:
    """Fetch what is missing (main process only; the others wait for it)."""
    if data.name == "cifar10":
        cifar10.ensure_cifar10(data.root, download=data.download)
    elif data.name == "imagefolder" and data.verify:
        # Every file's header, before any rank starts: a bad file fails all ranks at once, not one
        # rank mid-epoch.
        from distrain.data import imagefolder

        for split in ("train", "val"):
            imagefolder.check_readable(imagefolder.scan_imagefolder(data.root, split)[0])


def normalization(cfg: Config) -> tuple[tuple, tuple]:
    """The model's normalisation on this dataset (model_specs.preprocessing: the weights' own,
    or ImageNet statistics for photos, CIFAR-10's otherwise)."""
    mean, std, _, _ = preprocessing(cfg.model, cfg.data.name)
    return mean, std


def load_split(data: DataConfig, train: bool, seed: int, num_classes: int,
               input_size: int = 32, resize: Optional[int] = None) -> Split:
    """The training or test split of ``data``; ``seed`` draws synthetic data and image-folder
    augmentation, ``input_size`` is the decoded size of image-folder images and ``resize`` their
    evaluation resize (the model's weights' own; None: the default ratio)."""
    limit = data.max_train_samples if train else data.max_test_samples
    if data.name == "cifar10":
        # Decoded once and cached next to the data (invalidated when the files change): cache.py.
        images, labels, classes = load_cifar10_cached(data.root, train=train, verify=data.verify,
                                                      max_samples=limit)
    elif data.name == "synthetic":
        images, labels, classes = synthetic.make_synthetic(
            train=train, seed=seed, num_classes=num_classes, max_samples=limit)
    elif data.name == "imagefolder":
        return _image_folder(data, train, seed, input_size, limit, resize)
    else:  # validated by config; kept for clarity
        raise UserError(f"config key 'data.name': unknown dataset '{data.name}'")
    top = int(np.max(labels, initial=0))
    if top >= num_classes:
        raise UserError(f"config key 'model.num_classes' is {num_classes} but the {data.name} data "
                        f"has labels up to {top}; set model.num_classes={top + 1}")
    return Split(torch.from_numpy(np.ascontiguousarray(labels)).long(), list(classes),
                 images=torch.from_numpy(np.ascontiguousarray(images)), source=data.name)


def _image_folder(data: DataConfig, train: bool, seed: int, input_size: int,
                  limit: Optional[int], resize: Optional[int]) -> Split:
    from distrain.data import imagefolder

    split = "train" if train else "val"
    paths, labels, classes = imagefolder.scan_imagefolder(data.root, split)
    if limit is not None:
        paths, labels = paths[:limit], labels[:limit]
    ds = imagefolder.ImageFolderDataset(paths, labels, size=input_size, train=train,
                                        augment=data.augment and train, seed=seed, resize=resize)
    return Split(torch.as_tensor(np.asarray(labels), dtype=torch.int64), list(classes), dataset=ds,
                 source=os.path.join(data.root, split))


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
        if isinstance(i, tuple):  # (epoch, index) from PlanBatchSampler; augmented in batches
            i = i[1]
        return self.images[i], self.labels[i], i


def default_num_workers(local_world_size: int = 1) -> int:
    if hasattr(os, "sched_getaffinity"):
        cpus = len(os.sched_getaffinity(0))
    else:
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus // max(1, local_world_size) - 1))


class InputPipeline:
    """Normalised device batches of one split, for one rank, following the epoch plan."""

    def __init__(self, split: Split, spec: PipelineSpec, device: torch.device, rank: int,
                 world_size: int, train: bool, local_world_size: int = 1):
        self.split, self.spec, self.device = split, spec, torch.device(device)
        self.rank, self.world_size, self.train = rank, world_size, train
        self.normalize = Normalizer(spec.mean, spec.std, spec.input_size, self.device,
                                    spec.channels_last)
        # Image folders are augmented while decoding (random resized crop), in-memory splits here.
        self.augment = train and spec.augment and split.images is not None
        self.batch_size = spec.batch_size
        self.mode = self._choose_mode(spec.loader)
        self.plan: Optional[EpochPlan] = None
        self.start_micro = 0
        self._params: Optional[CropFlipParams] = None
        self.store: Optional[PaddedStore] = None
        if self.mode == "device":
            # Copied once; every later batch is a gather on the device.
            self.images = split.images.to(self.device)
            self.labels = split.labels.to(self.device)
            if self.augment:  # padded once: a batch's gather + crop is one row gather
                self.store = PaddedStore(self.images)
                self.images = self.store.images  # a view: the unpadded copy is not kept twice
                if split.images.device == self.device:
                    split.images = self.images  # nor by the split (same values, same device)
        else:
            ds = split.dataset
            if ds is None:
                ds = _InMemory(split.images, split.labels)
            workers = spec.num_workers
            if workers is None:
                workers = 0 if split.images is not None else default_num_workers(local_world_size)
            side = spec.input_size
            in_memory = split.images is not None
            self.sample_shape = tuple(split.images.shape[1:]) if in_memory else (3, side, side)
            shard = eval_shard(len(split), world_size, rank)
            if train:
                self.batch_sampler = PlanBatchSampler()
            else:
                self.batch_sampler = IndexBatchSampler(shard, self.batch_size)
            self.loader = torch.utils.data.DataLoader(
                ds, batch_sampler=self.batch_sampler, num_workers=workers, collate_fn=self._collate,
                pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                prefetch_factor=4 if workers > 0 else None,
            )

    def _choose_mode(self, wanted: str) -> str:
        in_memory = self.split.images is not None
        if wanted == "device" and not in_memory:
            raise UserError("config key 'data.loader=device' needs an in-memory dataset (cifar10, "
                            "synthetic); image folders use data.loader=dataloader")
        if wanted == "auto":
            if not in_memory:
                return "dataloader"
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                # The split or its padded store (1.6x, built beside it), and batches.
                need = self.split.images.numel() * (3 if self.augment else 2)
                return "device" if need < free // 4 else "dataloader"
            return "device"
        return wanted

    def _collate(self, batch):
        if not batch:  # a rank's share of the last global batch can be empty
            return (torch.empty((0, *self.sample_shape), dtype=torch.uint8),
                    torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))
        imgs, labels, idx = zip(*batch)
        return (torch.stack(imgs), torch.as_tensor(labels, dtype=torch.int64),
                torch.as_tensor(idx, dtype=torch.int64))

    # -- training --------------------------------------------------------------------------------
    def set_epoch(self, plan: EpochPlan, start_micro: int = 0) -> None:
        """Start ``plan`` at micro-batch ``start_micro``; skipped batches are never read."""
        self.plan, self.start_micro = plan, start_micro
        if self.augment:
            self._params = CropFlipParams.draw(len(self.split), self.spec.seed, plan.epoch)
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
                    x, y = x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb)
                    yield self._finish(x, y, idx)
            except UserError as e:  # from a worker, whose traceback the DataLoader wraps around it
                raise UserError(_worker_message(str(e))) from None

    def _gather(self, idx: torch.Tensor):
        idx_dev = idx.to(self.device, non_blocking=True)
        labels = torch.index_select(self.labels, 0, idx_dev)  # on a CPU ~9x faster than [idx]
        if self.store is not None:  # augmented here, in the same gather
            return self.store.crop_flip(idx_dev, self._params.take(idx_dev)), labels, idx
        return torch.index_select(self.images, 0, idx_dev), labels, idx

    def _finish(self, x, y, idx):
        if self.augment and self.store is None:
            x = crop_flip(x, self._params.take(idx.to(self._params.dx.device)))
        return self.normalize(x), y, idx
