"""`distrain predict`: top-k classes for image files, preprocessed exactly as eval inputs were.

Inputs are image files or directories (their image files, sorted, not recursive; dot-files and files
with other extensions are skipped). Any file Pillow reads works: PNG, JPEG, BMP, WebP, GIF, TIFF;
RGB, RGBA, grayscale (8 or 16 bit), palette, CMYK; any size or aspect ratio up to the pixel limit of
`distrain.images`, which owns decoding and the crop for predict and the image-folder dataset alike
(alpha dropped, 16-bit grayscale scaled to 8 bits, EXIF orientation not applied). Then, by the
dataset the model was trained on (model.json):

- CIFAR-10 / synthetic (32x32 images): the shorter side is resized to 32 and the centre 32x32
  cropped; the batch is then resized to the network input on the tensor, exactly as training and
  `eval` did (a CIFAR-10 test image saved as PNG gets the same input, logits and class as in eval);
- image folders: the shorter side is resized to `resize` (input size x 1.14) and the centre
  cropped, the image folder's own evaluation transform.

Normalisation uses the mean/std in model.json. Runs on the CPU whatever device trained the model.
Files are decoded one at a time and shrunk to their crop before the next is opened, so memory grows
neither with the batch size nor with the photos' resolution. Every unreadable input is a UserError
naming the file, raised before anything is printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from distrain.errors import UserError
from distrain.export import load_model
from distrain.images import center_crop, load_rgb, open_image, to_uint8_chw

__all__ = ["center_crop", "expand_inputs", "geometry", "load_rgb", "predict", "preprocess",
           "preprocess_batch"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
CIFAR_SIZE = 32  # the native size of the in-memory datasets (cifar10, synthetic)


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """Files as given, directories as their image files (sorted, not recursive, no dot-files)."""
    out: list[Path] = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith(".")
                           and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"directory '{p}' holds no image files (looked for "
                                f"{', '.join(sorted(IMAGE_SUFFIXES))}); give image files or a "
                                f"folder of them")
            out += found
        elif p.is_file():
            out.append(p)
        elif p.exists():
            raise UserError(f"image '{p}' is neither a file nor a directory")
        else:
            raise UserError(f"image '{p}' does not exist")
    return out


def geometry(info: dict) -> tuple[int, int, int]:
    """(resize the shorter side to, centre crop, network input size) for a model description."""
    size = int(info["input_size"][-1])
    if info.get("dataset") in ("cifar10", "synthetic"):
        return CIFAR_SIZE, CIFAR_SIZE, size
    return int(info.get("resize", size)), size, size


def _normalise(x: torch.Tensor, info: dict) -> torch.Tensor:
    """uint8 (N, 3, crop, crop) -> the normalised float batch at the network's input size."""
    from distrain.data.augment import Normalizer

    return Normalizer(info["mean"], info["std"], geometry(info)[2], "cpu")(x)


def _load_input(path: Path, info: dict) -> torch.Tensor:
    """One file's uint8 (3, crop, crop) input; its full-size pixels are gone when it returns."""
    resize, crop, _ = geometry(info)
    with open_image(path) as src:
        return to_uint8_chw(src.eval_crop(resize, crop))


def preprocess_batch(images: list, info: dict) -> torch.Tensor:
    """PIL RGB images -> the normalised (N, 3, S, S) float batch the network was evaluated on."""
    resize, crop, _ = geometry(info)
    crops = [to_uint8_chw(center_crop(img, resize, crop)) for img in images]
    return _normalise(torch.stack(crops), info)


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
        x = _normalise(torch.stack([_load_input(p, info) for p in chunk]), info)
        probs = torch.softmax(model(x).float(), dim=1)
        if not bool(torch.isfinite(probs).all()):  # finite weights can still overflow
            bad = chunk[int((~torch.isfinite(probs)).any(dim=1).nonzero()[0])]
            raise UserError(f"the model '{loaded.source}' gives non-finite outputs for '{bad}': its "
                            f"weights overflow; pick an earlier checkpoint")
        top_p, top_i = probs.topk(k, dim=1)
        for p, ps, ids in zip(chunk, top_p.tolist(), top_i.tolist()):
            results.append({
                "path": str(p),
                "class": classes[ids[0]],
                "index": ids[0],
                "probability": ps[0],
                "topk": [{"class": classes[j], "index": j, "probability": q}
                         for j, q in zip(ids, ps)],
            })
    return results
