"""Stand-ins for files the tests cannot download: CIFAR-10 batches, VGG16 weights, image folders.

Each writer produces the real format (official CIFAR-10 pickle layout, torchvision state_dict,
JPEG/PNG folders) with small, learnable, seeded contents. Plain functions, no pytest fixtures.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
import torchvision
from PIL import Image

PathLike = Union[str, os.PathLike]

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

VGG16_HUB_FILENAME = os.path.basename(torchvision.models.VGG16_Weights.IMAGENET1K_V1.url)  # vgg16-397923af.pth
VGG16_BN_HUB_FILENAME = os.path.basename(torchvision.models.VGG16_BN_Weights.IMAGENET1K_V1.url)  # vgg16_bn-6c64b313.pth


# -- CIFAR-10 ------------------------------------------------------------------------------------

class Py2StylePickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes what Python 2's cPickle wrote for the official batches at protocol 2.

    Python 2 had one string type, stored with (SHORT_)BINSTRING opcodes, and numpy lived under
    ``numpy.core.multiarray``; Python 3 would write ``_codecs.encode`` calls and ``numpy._core``.
    """

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_str(self, obj: Union[bytes, str]) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        n = len(data)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + data)
        else:
            self.write(pickle.BINSTRING + n.to_bytes(4, "little") + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj: Any, name: Any = None) -> None:
        name = name or obj.__name__
        module = pickle.whichmodule(obj, name).replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii"))
        self.memoize(obj)


def py2_pickle_dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    Py2StylePickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def fake_cifar_images(labels: np.ndarray, seed: int) -> np.ndarray:
    """(n, 3072) uint8 rows, CIFAR's channel-major order: a per-class colour and gradient plus noise."""
    rng = np.random.default_rng(seed)
    colours = np.random.default_rng(12345).integers(30, 226, size=(10, 3, 1, 1))
    yy, xx = np.mgrid[0:32, 0:32]
    grad = np.stack([(xx - 16) * (k % 3 - 1) + (yy - 16) * (k // 3 % 3 - 1) for k in range(10)])  # (10, 32, 32)
    x = colours[labels] + grad[labels][:, None] + rng.integers(-25, 26, size=(len(labels), 3, 32, 32))
    return np.clip(x, 0, 255).astype(np.uint8).reshape(len(labels), 3072)


def write_fake_cifar10(root: PathLike, n_train: int = 500, n_test: int = 100, seed: int = 0) -> Path:
    """Write ``<root>/cifar-10-batches-py`` in the official python layout; returns that folder.

    ``n_train`` images are split across data_batch_1..5 in order; labels are balanced and shuffled.
    """
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train_labels = rng.permutation(np.arange(n_train) % 10)
    test_labels = rng.permutation(np.arange(n_test) % 10)
    train_images = fake_cifar_images(train_labels, seed + 1)
    test_images = fake_cifar_images(test_labels, seed + 2)

    def batch(label: str, images: np.ndarray, labels: np.ndarray, start: int) -> dict:
        return {
            b"batch_label": label.encode(),
            b"labels": [int(v) for v in labels],
            b"data": np.ascontiguousarray(images, dtype=np.uint8),
            b"filenames": [f"fake_image_s_{start + i:06d}.png".encode() for i in range(len(labels))],
        }

    bounds = np.linspace(0, n_train, 6).astype(int)
    for b in range(5):
        lo, hi = bounds[b], bounds[b + 1]
        d = batch(f"training batch {b + 1} of 5", train_images[lo:hi], train_labels[lo:hi], lo)
        (folder / f"data_batch_{b + 1}").write_bytes(py2_pickle_dumps(d))
    (folder / "test_batch").write_bytes(py2_pickle_dumps(batch("testing batch 1 of 1", test_images, test_labels, 0)))
    meta = {
        b"label_names": [c.encode() for c in CIFAR_CLASSES],
        b"num_cases_per_batch": int(bounds[1] - bounds[0]),
        b"num_vis": 3072,
    }
    (folder / "batches.meta").write_bytes(py2_pickle_dumps(meta))
    return folder


def read_fake_batch(path: PathLike) -> dict:
    """Read a batch back with plain pickle (trusted test files only), as the CIFAR website's loader does."""
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


# -- VGG16 weights -------------------------------------------------------------------------------

def write_vgg16_weights(path: PathLike, seed: int = 0, bn: bool = False) -> Path:
    """Save a random torchvision VGG16 (or VGG16-BN) state_dict, 1000-class head, like the hub file.

    Put it at ``$TORCH_HOME/hub/checkpoints/`` + ``VGG16_HUB_FILENAME`` to stand in for the download
    (torch.hub checks the hash prefix only when downloading).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        model = (torchvision.models.vgg16_bn if bn else torchvision.models.vgg16)(weights=None)
    torch.save(model.state_dict(), path)
    return path


# -- image folders -------------------------------------------------------------------------------

_SIZES = [(17, 23), (300, 200), (64, 64), (45, 120), (32, 32), (200, 301)]
_MODES = ["RGB", "RGBA", "L", "P"]


def _class_colour(k: int, n: int) -> tuple[int, int, int]:
    # Spread in hue and in brightness, so classes differ even in greyscale ("L") files.
    hue = int(255 * k / max(n, 1))
    value = 90 + int(150 * k / max(n - 1, 1))
    rgb = Image.new("HSV", (1, 1), (hue, 200, value)).convert("RGB").getpixel((0, 0))
    return tuple(int(c) for c in rgb)  # type: ignore[return-value]


def fake_photo(size: tuple[int, int], mode: str, colour: tuple[int, int, int], rng: np.random.Generator) -> Image.Image:
    w, h = size
    arr = np.clip(np.array(colour, dtype=np.int16) + rng.integers(-20, 21, size=(h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(128, 256, size=(h, w), dtype=np.uint8), "L")
        img = img.convert("RGBA")
        img.putalpha(alpha)
        return img
    if mode == "P":
        return img.convert("P", palette=Image.ADAPTIVE, colors=32)
    return img.convert(mode)


def write_image_folder(
    root: PathLike,
    classes: Sequence[str] = ("ants", "bees"),
    per_class_train: int = 6,
    per_class_val: int = 3,
    seed: int = 0,
) -> Path:
    """``<root>/train/<class>/`` and ``<root>/val/<class>/`` of JPEG and PNG files of odd sizes and modes.

    Files cycle through sizes 17x23 .. 300x200 and modes RGB, RGBA, L, P; RGB and L alternate
    between JPEG and PNG, RGBA and P are PNG (JPEG cannot hold them). Returns ``root``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    counter = 0
    for split, per_class in (("train", per_class_train), ("val", per_class_val)):
        for k, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                size = _SIZES[counter % len(_SIZES)]
                mode = _MODES[counter % len(_MODES)]
                ext = "jpg" if mode in ("RGB", "L") and (counter // len(_MODES)) % 2 == 0 else "png"
                if ext == "jpg" and j % 3 == 2:
                    ext = "JPEG"  # upper-case and long extensions count too
                img = fake_photo(size, mode, _class_colour(k, len(classes)), rng)
                img.save(d / f"{cls}_{j:03d}.{ext}", format="JPEG" if ext.lower() in ("jpg", "jpeg") else "PNG")
                counter += 1
    return root


# -- any torchvision / timm model's weights ------------------------------------------------------

def random_state_dict(model: torch.nn.Module, seed: int = 0) -> dict:
    """Random tensors with exactly ``model``'s state_dict keys, shapes and dtypes (model may be meta).

    Weights ~ N(0, 0.05); BatchNorm running variances positive; integer buffers (batch counts) 0.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if not v.dtype.is_floating_point:
            out[k] = torch.zeros(v.shape, dtype=v.dtype)
        elif k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            out[k] = torch.randn(v.shape, generator=g) * 0.05
    return out


def write_model_weights(path: PathLike, name: str, seed: int = 0) -> Path:
    """A stand-in for a pretrained file of torchvision model ``name`` (or ``timm:NAME``): its
    torchvision (timm) default build with the 1000-class head, random values, saved with torch.save
    (a ``.safetensors`` path: safetensors). Built on the meta device: only the file costs memory."""
    from distrain.model_specs import TIMM_PREFIX, on_meta

    if name.startswith(TIMM_PREFIX):
        import timm

        model = on_meta(lambda: timm.create_model(name[len(TIMM_PREFIX):], pretrained=False))
    else:
        model = on_meta(lambda: torchvision.models.get_model(name, weights=None))
    sd = random_state_dict(model, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


def hub_weights_path(torch_home: PathLike, name: str, weights: str = "DEFAULT") -> Path:
    """Where torchvision's hub cache under ``torch_home`` keeps the file of ``name``'s weights."""
    w = torchvision.models.get_model_weights(name)[weights]
    return Path(torch_home) / "hub" / "checkpoints" / os.path.basename(w.url)


def write_hf_cache_file(cache: PathLike, repo: str, filename: str, src: PathLike) -> Path:
    """Lay ``src`` out as the Hugging Face hub cache keeps a download (refs/main -> snapshot)."""
    import shutil

    base = Path(cache) / ("models--" + repo.replace("/", "--"))
    commit = "0" * 40
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(commit)
    dst = base / "snapshots" / commit / filename
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst
