"""CIFAR-10 from the official python-version files, checked and read without running pickled code.

Layout (what ``cifar-10-python.tar.gz`` extracts to)::

    <root>/cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch, batches.meta

Every bad-input case raises ``UserError`` naming the exact file and what to do about it.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Optional

import numpy as np

from distrain.data.safe_pickle import safe_load
from distrain.errors import UserError

BASE_FOLDER = "cifar-10-batches-py"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"  # what torchvision fetches
TRAIN_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
TEST_FILES = ("test_batch",)
META_FILE = "batches.meta"

# Official MD5 sums (the same as torchvision.datasets.CIFAR10.train_list / test_list / meta).
CIFAR10_FILES: dict[str, str] = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}

CLASSES: list[str] = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)
_ROW = 3 * 32 * 32


def batches_dir(root: str) -> str:
    return os.path.join(os.fspath(root), BASE_FOLDER)


def split_files(train: bool) -> tuple[str, ...]:
    return TRAIN_FILES if train else TEST_FILES


def md5sum(path: str, chunk_size: int = 1 << 20) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def _missing_files(root: str) -> list[str]:
    folder = batches_dir(root)
    return [name for name in (*TRAIN_FILES, *TEST_FILES, META_FILE) if not os.path.isfile(os.path.join(folder, name))]


def _missing_message(root: str, missing: list[str]) -> str:
    folder = batches_dir(root)
    if not os.path.isdir(folder):
        msg = f"CIFAR-10 folder '{folder}' does not exist"
        if os.path.isfile(os.path.join(os.fspath(root), "data_batch_1")):
            # A common slip: pointing data.root at the extracted folder itself.
            msg += f" ('{root}' holds the batch files itself: set data.root to its parent folder)"
        return msg + f"; set data.download=true or put the extracted '{BASE_FOLDER}' files there"
    names = ", ".join(os.path.join(folder, m) for m in missing)
    return (f"CIFAR-10 file(s) missing: {names}; set data.download=true or put the official "
            f"'{BASE_FOLDER}' files there")


def download_cifar10(root: str) -> None:
    """Fetch and extract the official archive under ``root`` with torchvision (main process only)."""
    try:
        # Looked up at call time so tests can replace torchvision.datasets.CIFAR10.
        import torchvision.datasets

        torchvision.datasets.CIFAR10(os.fspath(root), train=True, download=True)
    except Exception as e:  # URLError, timeouts, disk full, bad archive, torchvision's checksum RuntimeError
        raise UserError(
            f"CIFAR-10 download to '{root}' failed ({type(e).__name__}: {e}); torchvision fetches {URL}. "
            f"Fix the network, or download and extract that archive by hand so that "
            f"'{batches_dir(root)}' holds its files"
        ) from e
    missing = _missing_files(root)
    if missing:
        raise UserError("CIFAR-10 download finished but " + _missing_message(root, missing))


def ensure_cifar10(root: str, download: bool) -> None:
    """Make sure every official file is present, downloading them if allowed."""
    missing = _missing_files(root)
    if not missing:
        return
    if not download:
        raise UserError(_missing_message(root, missing))
    download_cifar10(root)


def _read_pickle(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return safe_load(f)
    except OSError as e:
        raise UserError(f"cannot read CIFAR-10 file '{path}': {e}") from e
    except Exception as e:  # truncated, garbage, refused global: all mean the file is not an official batch
        raise UserError(
            f"CIFAR-10 file '{path}' is not a valid CIFAR-10 python batch ({type(e).__name__}: {e}); "
            f"delete it and download or extract it again"
        ) from e


def _get(d: dict, key: str) -> Any:
    """Official files (Python 2 pickles) have bytes keys; accept str keys from re-pickled copies too."""
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


def _bad(path: str, what: str) -> UserError:
    return UserError(f"CIFAR-10 file '{path}' is not a valid CIFAR-10 python batch: {what}; "
                     f"delete it and download or extract it again")


def _read_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    d = _read_pickle(path)
    if not isinstance(d, dict):
        raise _bad(path, f"it holds a {type(d).__name__}, not a dict")
    data, labels = _get(d, "data"), _get(d, "labels")
    if data is None or labels is None:
        raise _bad(path, "key b'data' or b'labels' is missing")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise _bad(path, f"b'data' must be a uint8 array of shape (n, {_ROW}), got {desc}")
    try:
        lab = np.asarray(labels)
    except Exception:
        lab = np.empty(0, dtype=object)
    if lab.ndim != 1 or not np.issubdtype(lab.dtype, np.integer):
        raise _bad(path, "b'labels' must be a list of integers")
    if len(lab) != len(data):
        raise _bad(path, f"{len(data)} images but {len(lab)} labels")
    if len(lab) and (lab.min() < 0 or lab.max() >= NUM_CLASSES):
        raise _bad(path, f"labels must be in 0..{NUM_CLASSES - 1}, found {int(lab.min())}..{int(lab.max())}")
    return data, lab.astype(np.int64)


def _read_classes(path: str) -> list[str]:
    d = _read_pickle(path)
    names = _get(d, "label_names") if isinstance(d, dict) else None
    if not isinstance(names, list) or len(names) != NUM_CLASSES or not all(isinstance(n, (bytes, str)) for n in names):
        raise _bad(path, f"b'label_names' must be a list of {NUM_CLASSES} names")
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]


def _check_md5(path: str, name: str) -> None:
    actual = md5sum(path)
    expected = CIFAR10_FILES[name]
    if actual != expected:
        raise UserError(
            f"CIFAR-10 file '{path}' has MD5 {actual}, expected the official {expected}; it is corrupt or not the "
            f"official file: download it again, or set data.verify=false to accept other contents"
        )


def load_cifar10(
    root: str, train: bool, verify: bool = True, max_samples: Optional[int] = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One split as (uint8 images (N, 3, 32, 32) C-contiguous, int64 labels (N,), class names).

    ``max_samples`` keeps the first N images in file order; batches past them are neither read nor
    checksummed, but every file of the split must exist. The structure is checked even with
    ``verify=False``, which only skips the MD5 comparison.
    """
    if max_samples is not None and (isinstance(max_samples, bool) or int(max_samples) < 1):
        raise UserError(f"CIFAR-10 max_samples must be a positive integer or null, got {max_samples!r}")
    folder = batches_dir(root)
    names = split_files(train)
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise UserError(_missing_message(root, missing))

    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    have = 0
    for name in names:
        if max_samples is not None and have >= max_samples:
            break
        path = os.path.join(folder, name)
        if verify:
            _check_md5(path, name)
        data, lab = _read_batch(path)
        images.append(data)
        labels.append(lab)
        have += len(data)

    classes = list(CLASSES)
    meta = os.path.join(folder, META_FILE)
    if os.path.isfile(meta):
        if verify:
            _check_md5(meta, META_FILE)
        classes = _read_classes(meta)

    # Copied once into a fresh owned array: unpickled batches may be read-only or alias their buffers.
    total = have if max_samples is None else min(have, int(max_samples))
    x = np.empty((total, _ROW), dtype=np.uint8)
    y = np.empty(total, dtype=np.int64)
    pos = 0
    for data, lab in zip(images, labels):
        take = min(len(data), total - pos)
        x[pos : pos + take] = data[:take]
        y[pos : pos + take] = lab[:take]
        pos += take
    return x.reshape(-1, *IMAGE_SHAPE), y, classes
