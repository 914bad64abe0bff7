"""`distrain predict`: top-k classes for image files, preprocessed exactly as the model's evaluation inputs.

Any PNG/JPEG (RGB, RGBA, grayscale, palette; any size) is converted to RGB, its shorter side resized to
the model's `resize`, centre-cropped to its input size and normalised with the statistics in model.json.
Runs on the CPU whatever device trained the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from distrain.errors import UserError
from distrain.export import load_model

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; directories expand to their image files (sorted, not recursive)."""
    out: list[Path] = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"directory '{p}' holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"image '{p}' does not exist")
    return out


def load_rgb(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                # Composite transparency on black, as CIFAR-style training images have no alpha.
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
                im = Image.alpha_composite(bg, im)
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"'{path}' is not a readable image ({type(e).__name__}: {e}); give PNG or JPEG files") from None


def preprocess(img, info: dict) -> torch.Tensor:
    """PIL RGB image -> normalised (3, S, S) float tensor."""
    from PIL import Image

    size = int(info["input_size"][-1])
    resize = int(info.get("resize", size))
    w, h = img.size
    scale = resize / min(w, h)
    nw, nh = max(resize, round(w * scale)), max(resize, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    mean = torch.tensor(info["mean"]).view(3, 1, 1) * 255
    std = torch.tensor(info["std"]).view(3, 1, 1) * 255
    return (x - mean) / std


@torch.no_grad()
def predict(checkpoint: str, inputs: list[str], topk: int = 1, batch_size: int = 64) -> list[dict]:
    loaded = load_model(checkpoint)
    info = loaded.info
    classes = info.get("classes") or [str(i) for i in range(info["num_classes"])]
    k = min(topk, len(classes))
    paths = expand_inputs(inputs)
    model = loaded.model.eval()
    results = []
    for i in range(0, len(paths), batch_size):
        chunk = paths[i : i + batch_size]
        x = torch.stack([preprocess(load_rgb(p), info) for p in chunk])
        probs = torch.softmax(model(x).float(), dim=1)
        top_p, top_i = probs.topk(k, dim=1)
        for p, ps, ids in zip(chunk, top_p.tolist(), top_i.tolist()):
            results.append({
                "path": str(p),
                "class": classes[ids[0]],
                "probability": ps[0],
                "topk": [{"class": classes[j], "index": j, "probability": q} for j, q in zip(ids, ps)],
            })
    return results
