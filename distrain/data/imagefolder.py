"""Image-folder datasets: ``<root>/train/<class>/*`` and ``<root>/val/<class>/*`` (JPEG, PNG, ...).

Files of any size and mode are decoded to RGB and cropped to a square ``size`` (decoding, the eval
geometry and its bounded memory are `distrain.images`'). Training
augmentation (random resized crop + horizontal flip) draws its randomness from ``(seed, epoch,
index)`` alone, so an image's crop does not depend on the worker, process or resume point.
Images stay uint8; normalisation happens later, on the device.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from distrain.data.sampling import derived_seed
from distrain.errors import UserError
from distrain.images import (EVAL_RESIZE_RATIO, center_crop, eval_resize, load_rgb, open_image,
                             to_uint8_chw)

__all__ = ["EVAL_RESIZE_RATIO", "ImageFolderDataset", "check_readable", "check_same_classes",
           "eval_transform", "load_image_rgb", "load_item", "scan_imagefolder", "train_transform"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CROP_SCALE = (0.35, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_AUG_TAG = 0x1F0D  # separates these seeds from other users of derived_seed(seed, epoch, ...)


def _is_image_file(name: str) -> bool:
    # Dot-files are skipped: macOS '._x.jpg' resource forks carry an image extension but no image.
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def scan_imagefolder(root: str, split: str) -> tuple[list[str], np.ndarray, list[str]]:
    """(paths, int64 labels, class names) of ``<root>/<split>``.

    Classes are the sorted sub-folder names; files are found recursively, sorted within each class,
    and listed class by class (as torchvision's ImageFolder does), so labels are non-decreasing.
    Files without an image extension (.jpg .jpeg .png .bmp .webp, any case) are ignored.

    Symbolic links are followed, but each real directory is walked once per split: a link back to
    a folder above it (a loop), a second link to a folder already walked, or a link into another
    class's folder adds no files (those would be counted again, or under the wrong label). A file
    linked twice by name counts twice: a link to a file is taken as meant.
    """
    split_dir = os.path.join(os.fspath(root), split)
    if not os.path.isdir(split_dir):
        raise UserError(f"image folder split '{split_dir}' does not exist; data.root must hold "
                        f"train/<class>/ and val/<class>/ folders of images")
    classes = sorted(e.name for e in os.scandir(split_dir)
                     if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UserError(f"image folder split '{split_dir}' has no class folders; put each class's "
                        f"images in '{split_dir}/<class name>/'")
    walked = {_dir_id(split_dir)} | {_dir_id(os.path.join(split_dir, c)) for c in classes}
    paths: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        cls_dir = os.path.join(split_dir, cls)
        found = sorted(_image_files(cls_dir, walked))
        if not found:
            raise UserError(f"class folder '{cls_dir}' has no images (looked for "
                            f"{', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder from "
                            f"every split")
        paths.extend(found)
        labels.extend([label] * len(found))
    return paths, np.asarray(labels, dtype=np.int64), classes


def _dir_id(path: str) -> tuple[int, int]:
    st = os.stat(path)  # follows links: the identity of the real directory
    return st.st_dev, st.st_ino


def _image_files(top: str, walked: set) -> list[str]:
    """Image files under ``top``; hidden folders and real directories already ``walked`` skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            try:
                key = _dir_id(os.path.join(dirpath, d))
            except OSError:  # vanished, or not permitted: os.walk would skip it too
                continue
            if key not in walked:
                walked.add(key)
                keep.append(d)
        dirnames[:] = keep
        found.extend(os.path.join(dirpath, f) for f in filenames if _is_image_file(f))
    return found


def check_same_classes(train_classes: Sequence[str], val_classes: Sequence[str]) -> None:
    """Labels index the sorted class names, so both splits must have exactly the same classes."""
    train_set, val_set = set(train_classes), set(val_classes)
    if train_set == val_set:
        return
    parts = []
    if train_set - val_set:
        parts.append(f"only in train: {', '.join(sorted(train_set - val_set))}")
    if val_set - train_set:
        parts.append(f"only in val: {', '.join(sorted(val_set - train_set))}")
    raise UserError(f"image folder train and val class folders differ ({'; '.join(parts)}); "
                    f"give both splits the same class folders")


def check_readable(paths: Sequence[str], threads: int = 8) -> None:
    """Open every file's header (format and size, no pixels); UserError naming the first bad file.

    Catches non-images, empty files and unsupported formats before training starts
    (``data.verify``); a file whose pixel data is truncated still fails later, when it is decoded,
    naming the file too.
    """
    from concurrent.futures import ThreadPoolExecutor

    def probe(path: str):
        try:
            with Image.open(path) as img:
                img.size  # noqa: B018 - the header parsed
            return None
        except Exception as e:  # noqa: BLE001 - UnidentifiedImageError, OSError, DecompressionBomb
            return path, e

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for bad in pool.map(probe, paths, chunksize=64):
            if bad is not None:
                path, e = bad
                raise UserError(f"cannot read image '{path}' ({type(e).__name__}: {e}); fix or "
                                f"delete the file (data.verify=false skips this check of every "
                                f"file before training)")


def load_image_rgb(path: str) -> Image.Image:
    """Decode ``path`` to a full-size RGB image, whatever its mode (`distrain.images.load_rgb`)."""
    return load_rgb(path)


def eval_transform(img: Image.Image, size: int, resize: Optional[int] = None) -> Image.Image:
    """Shorter side to ``resize`` (default round(size*1.14)), then the centre ``size`` square
    (Resize + CenterCrop)."""
    return center_crop(img, resize or eval_resize(size), size)


def random_resized_crop_box(
    width: int, height: int, g: torch.Generator, scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
    """(top, left, h, w) as torchvision's RandomResizedCrop.get_params, drawing only from ``g``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=g).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=g).item())
            return top, left, h, w
    # Fallback to a central crop of the allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_transform(img: Image.Image, size: int, g: torch.Generator) -> Image.Image:
    """Random resized crop to ``size``, then a horizontal flip with probability 1/2, from ``g``."""
    top, left, h, w = random_resized_crop_box(img.width, img.height, g)
    img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    return _maybe_flip(img, g)


def _maybe_flip(img: Image.Image, g: torch.Generator) -> Image.Image:
    if torch.rand(1, generator=g).item() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


def load_item(path: str, size: int, g: Optional[torch.Generator],
              resize: Optional[int] = None) -> torch.Tensor:
    """One file as a uint8 (3, size, size) tensor: `train_transform` drawn from ``g``, or else
    `eval_transform`.

    The pixels of decoding the file and applying the transform, but the crop box is chosen on the
    file's size first, so no more is decoded and resized than needed (see `distrain.images`).
    """
    with open_image(path) as src:
        if g is None:
            return to_uint8_chw(src.eval_crop(resize or eval_resize(size), size))
        top, left, h, w = random_resized_crop_box(*src.size, g)
        img = src.resized_region((left, top, left + w, top + h), (size, size))
    return to_uint8_chw(_maybe_flip(img, g))


class ImageFolderDataset(torch.utils.data.Dataset):
    """Decodes image files to ``(uint8 tensor (3, size, size), label, index)``.

    With ``train and augment``: random resized crop (scale 0.35-1) + horizontal flip, seeded by
    ``(seed, epoch, index)``; otherwise the eval resize + center crop. ``set_epoch`` changes the
    epoch; a DataLoader with persistent workers keeps its own copy of the dataset, so a worker only
    sees a later ``set_epoch`` if the index carries it: ``dataset[(epoch, i)]`` is also accepted.
    """

    def __init__(self, paths: Sequence[str], labels: Union[np.ndarray, Sequence[int]], size: int,
                 train: bool, augment: bool, seed: int, resize: Optional[int] = None):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        if int(size) < 1:
            raise UserError(f"image size must be >= 1, got {size}; set model.input_size")
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.size = int(size)
        self.resize = resize  # the eval transform's shorter side (the model's weights decide it)
        self.train = bool(train)
        self.augment = bool(augment) and self.train
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def item_generator(self, epoch: int, index: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(derived_seed(self.seed, epoch, index, _AUG_TAG))
        return g

    def __getitem__(self, index: Union[int, tuple[int, int]]) -> tuple[torch.Tensor, int, int]:
        if isinstance(index, tuple):
            epoch, i = int(index[0]), int(index[1])
        else:
            epoch, i = self.epoch, int(index)
        g = self.item_generator(epoch, i) if self.augment else None
        return load_item(self.paths[i], self.size, g, self.resize), int(self.labels[i]), i
