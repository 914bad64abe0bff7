"""Decoded CIFAR-10 splits cached on disk next to the data: later runs skip unpickling and MD5 work.

``<root>/cifar-10-batches-py/distrain-cache/{train,test}.safetensors`` holds a split's uint8 images
``(N, 3, 32, 32)`` and int64 labels; its metadata holds the class names and the *signature* of the
files it was decoded from (name, size, mtime, ctime and inode of each batch file and
``batches.meta``) and whether their MD5 sums were checked.

- Invalidation: a cache is used only while the signature matches the files as they are now;
  rewriting, replacing, truncating, copying or touching any source file changes it. With
  ``data.verify=true`` a cache counts only if it was written after the MD5 check passed on those
  same files.
- Timestamps are coarse (a file rewritten within the same clock tick keeps its mtime), so a cache is
  only written when every source file is older than ``SETTLE_S`` seconds and the signature did not
  change while the files were read. Fresh downloads are therefore cached by the second run.
- Written atomically (temporary file + ``os.replace``), only from a whole split (a ``max_samples``
  run reads only the batches it needs and caches nothing, but uses a whole-split cache when there
  is one). Concurrent ranks may each write it: every writer produces the same bytes and the rename
  is atomic.
- A temporary is named ``<split>.safetensors.<host>.<pid>.<random>.tmp``; each writer first removes
  the temporaries of writers that are gone (``<pid>`` not running on this host, or older than
  ``STALE_TEMP_S``), so killed writes do not pile up (each is a whole split, ~150 MB). Removing a
  live writer's temporary by mistake only makes its best-effort write fail.
- Best effort: a cache that cannot be written (read-only data, full disk) or read (corrupt, other
  format) is ignored and the batches are decoded as without it. ``DISTRAIN_DATA_CACHE=0`` turns it
  off, ``=ro`` only reads it; `distrain bench` only reads it (it writes nothing).

A small saving per process start, larger on slow or network file systems, where the 180 MB of
pickles are otherwise read only to re-check and re-decode them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
import uuid
from typing import Iterator, Optional

import numpy as np

from distrain.data import cifar10

FORMAT = "distrain-cifar10-cache-v1"
CACHE_DIR = "distrain-cache"
SETTLE_S = 2.0  # source files younger than this are not cached (coarse timestamps; see above)
STALE_TEMP_S = 3600.0  # a temporary this old is a dead writer's, whichever host wrote it
_TEMP = re.compile(r"^(train|test)\.safetensors\.(?:(?P<host>.+)\.)?(?P<pid>\d+)\.[0-9a-f]{8}"
                   r"\.tmp$")
_ENV = "DISTRAIN_DATA_CACHE"
_read_only_depth = 0


@contextlib.contextmanager
def read_only() -> Iterator[None]:
    """Within this block caches are read but never written (used by `distrain bench`)."""
    global _read_only_depth
    _read_only_depth += 1
    try:
        yield
    finally:
        _read_only_depth -= 1


def _mode() -> str:
    env = os.environ.get(_ENV, "1").strip().lower()
    if env in ("0", "off", "false", "no"):
        return "off"
    if env in ("ro", "read", "readonly", "read-only") or _read_only_depth:
        return "read"
    return "readwrite"


def cache_path(root: str, train: bool) -> str:
    name = ("train" if train else "test") + ".safetensors"
    return os.path.join(cifar10.batches_dir(root), CACHE_DIR, name)


def source_signature(root: str, train: bool) -> Optional[list]:
    """[(name, size, mtime_ns, ctime_ns, inode), ...] of the split's files and batches.meta.

    None if one is missing."""
    folder = cifar10.batches_dir(root)
    sig = []
    for name in (*cifar10.split_files(train), cifar10.META_FILE):
        try:
            st = os.stat(os.path.join(folder, name))
        except OSError:
            if name == cifar10.META_FILE:  # optional for the loader: its absence is signed too
                sig.append([name, None, None, None, None])
                continue
            return None
        sig.append([name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    return sig


def _settled(sig: list, now: float) -> bool:
    newest = max((max(s[2], s[3]) for s in sig if s[1] is not None), default=0)
    return now - newest / 1e9 >= SETTLE_S


def read_cache(root: str, train: bool, verify: bool, max_samples: Optional[int] = None):
    """(images, labels, classes) from a valid cache, else None."""
    path = cache_path(root, train)
    if _mode() == "off" or not os.path.isfile(path):
        return None
    sig = source_signature(root, train)
    if sig is None:
        return None
    try:
        from safetensors import safe_open

        with safe_open(path, framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or json.loads(meta.get("sources", "null")) != sig:
                return None
            if verify and meta.get("verified") != "1":
                return None
            classes = json.loads(meta["classes"])
            images_slice, labels = f.get_slice("images"), f.get_tensor("labels")
            shape = images_slice.get_shape()
            n = len(labels) if max_samples is None else min(len(labels), int(max_samples))
            if (list(shape[1:]) != list(cifar10.IMAGE_SHAPE) or shape[0] != len(labels)
                    or images_slice.get_dtype() != "U8" or labels.dtype != np.int64):
                return None
            images = images_slice[:n]
    except Exception:  # noqa: BLE001 - a corrupt or foreign cache is ignored, never an error
        return None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return None
    return np.ascontiguousarray(images), np.ascontiguousarray(labels[:n]), classes


def write_cache(root: str, train: bool, sig: list, verified: bool, images: np.ndarray,
                labels: np.ndarray, classes: list) -> bool:
    """Atomically write a whole split's cache; False (and nothing left behind) when it cannot."""
    if _mode() != "readwrite":
        return False
    path = cache_path(root, train)
    tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        from safetensors.numpy import save_file

        os.makedirs(os.path.dirname(path), exist_ok=True)
        remove_stale_temporaries(os.path.dirname(path))
        meta = {"format": FORMAT, "sources": json.dumps(sig), "verified": "1" if verified else "0",
                "classes": json.dumps(list(classes))}
        tensors = {"images": np.ascontiguousarray(images),
                   "labels": np.ascontiguousarray(labels, dtype=np.int64)}
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
        return True
    except Exception:  # noqa: BLE001 - read-only or full file system: run without a cache
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def remove_stale_temporaries(cache_dir: str, now: Optional[float] = None) -> list[str]:
    """Remove the temporaries of dead writers in ``cache_dir`` (see the module docstring)."""
    now = time.time() if now is None else now
    host, removed = socket.gethostname(), []
    for entry in os.scandir(cache_dir):
        m = _TEMP.match(entry.name)
        if not m:
            continue
        with contextlib.suppress(OSError):
            here = m.group("host") in (None, host)  # no host: an older version's name
            dead = here and not _pid_alive(int(m.group("pid")))
            if dead or now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_S:
                os.unlink(entry.path)
                removed.append(entry.path)
    return removed


def load_cifar10_cached(root: str, train: bool, verify: bool = True,
                        max_samples: Optional[int] = None):
    """`cifar10.load_cifar10` with the on-disk cache in front of it; the same result either way."""
    if max_samples is not None and (isinstance(max_samples, bool) or int(max_samples) < 1):
        # its error
        return cifar10.load_cifar10(root, train=train, verify=verify, max_samples=max_samples)
    hit = read_cache(root, train, verify, max_samples)
    if hit is not None:
        return hit
    before = source_signature(root, train)
    started = time.time()
    images, labels, classes = cifar10.load_cifar10(root, train=train, verify=verify,
                                                   max_samples=max_samples)
    whole = max_samples is None and before is not None
    if whole and _settled(before, started) and _mode() == "readwrite":
        if source_signature(root, train) == before:  # unchanged while we read it
            write_cache(root, train, before, verify, images, labels, classes)
    return images, labels, classes
