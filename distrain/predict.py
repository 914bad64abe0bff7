"""`distrain predict`: top-k classes for image files, preprocessed exactly as the model's evaluation inputs.

Inputs are image files or directories (their image files, sorted, not recursive; dot-files and files
with other extensions are skipped). Any file Pillow reads works: PNG, JPEG, BMP, WebP, GIF, TIFF; RGB,
RGBA, grayscale (8 or 16 bit), palette, CMYK; any size. Decoding follows the image-folder dataset
(`data.imagefolder`): alpha is dropped, 16-bit grayscale is scaled to 8 bits, EXIF orientation is not
applied. Then, by the dataset the model was trained on (model.json):

- CIFAR-10 / synthetic (32x32 images): the shorter side is resized to 32 and the centre 32x32 cropped;
  the batch is then resized to the network input on the tensor, exactly as training and `eval` did
  (so a CIFAR-10 test image saved as PNG gets the same input, logits and class as in `distrain eval`);
- image folders: the shorter side is resized to `resize` (input size x 1.14) and the centre cropped,
  the image folder's own evaluation transform.

Normalisation uses the mean/std in model.json. Runs on the CPU whatever device trained the model.
Every unreadable input is a UserError naming the file, raised before anything is printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from distrain.errors import UserError
from distrain.export import load_model

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
CIFAR_SIZE = 32  # the native size of the in-memory datasets (cifar10, synthetic)


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """Files as given; directories expand to their image files (sorted, not recursive, no dot-files)."""
    out: list[Path] = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            found = sorted(q for q in p.iterdir()
                           if q.is_file() and not q.name.startswith(".") and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"directory '{p}' holds no image files (looked for "
                                f"{', '.join(sorted(IMAGE_SUFFIXES))}); give image files or a folder of them")
            out += found
        elif p.is_file():
            out.append(p)
        elif p.exists():
            raise UserError(f"image '{p}' is neither a file nor a directory")
        else:
            raise UserError(f"image '{p}' does not exist")
    return out


def load_rgb(path: Path):
    """Decode ``path`` to a PIL RGB image (as the image-folder dataset does); UserError naming it otherwise."""
    from PIL import Image, UnidentifiedImageError

    from distrain.data.imagefolder import _to_rgb

    try:
        with Image.open(path) as im:
            im.load()
            rgb = _to_rgb(im)
            rgb.load()
            return rgb if rgb is not im else im.copy()
    except UnidentifiedImageError:
        raise UserError(f"'{path}' is not an image file (its format is not one Pillow reads); "
                        f"give PNG or JPEG files") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"'{path}' is not a readable image ({type(e).__name__}: {e}); "
                        f"the file is damaged or truncated: replace it") from None


def geometry(info: dict) -> tuple[int, int, int]:
    """(resize the shorter side to, centre crop, network input size) for a model description."""
    size = int(info["input_size"][-1])
    if info.get("dataset") in ("cifar10", "synthetic"):
        return CIFAR_SIZE, CIFAR_SIZE, size
    return int(info.get("resize", size)), size, size


def center_crop(img, resize: int, crop: int):
    """Shorter side to ``resize`` (bilinear), then the centre ``crop`` x ``crop`` (the image folder's eval transform)."""
    from PIL import Image

    w, h = img.size
    if w <= h:
        nw, nh = resize, max(int(resize * h / w), resize)
    else:
        nw, nh = max(int(resize * w / h), resize), resize
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    top = int(round((nh - crop) / 2.0))
    left = int(round((nw - crop) / 2.0))
    return img.crop((left, top, left + crop, top + crop))


def to_uint8_chw(img) -> torch.Tensor:
    return torch.from_numpy(np.array(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1), order="C"))


def preprocess_batch(images: list, info: dict) -> torch.Tensor:
    """PIL RGB images -> the normalised (N, 3, S, S) float batch the network was evaluated on."""
    from distrain.data.augment import Normalizer

    resize, crop, size = geometry(info)
    x = torch.stack([to_uint8_chw(center_crop(img, resize, crop)) for img in images])
    return Normalizer(info["mean"], info["std"], size, "cpu")(x)


def preprocess(img, info: dict) -> torch.Tensor:
    """One PIL RGB image -> normalised (3, S, S) float tensor."""
    return preprocess_batch([img], info)[0]


@torch.no_grad()
def predict(checkpoint: str, inputs: list[str], topk: int = 1, batch_size: int = 64) -> list[dict]:
    """One record per image, in input order: path, class, probability, and the top-k classes."""
    if topk < 1:
        raise UserError(f"--topk must be >= 1, got {topk}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    paths = expand_inputs(inputs)  # before loading the model: a typo in a path fails fast
    loaded = load_model(checkpoint)
    info = loaded.info
    n = int(info["num_classes"])
    classes = [str(c) for c in (info.get("classes") or [])]
    if len(classes) != n:
        classes = [str(i) for i in range(n)]
    k = min(topk, n)
    model = loaded.model.float().eval()
    results = []
    for i in range(0, len(paths), batch_size):
        chunk = paths[i : i + batch_size]
        x = preprocess_batch([load_rgb(p) for p in chunk], info)
        probs = torch.softmax(model(x).float(), dim=1)
        top_p, top_i = probs.topk(k, dim=1)
        for p, ps, ids in zip(chunk, top_p.tolist(), top_i.tolist()):
            results.append({
                "path": str(p),
                "class": classes[ids[0]],
                "index": ids[0],
                "probability": ps[0],
                "topk": [{"class": classes[j], "index": j, "probability": q} for j, q in zip(ids, ps)],
            })
    return results
