"""Decoding image files and the evaluation geometry: the one owner for `predict` and image folders.

Invariants:
- Decoding: any mode Pillow reads becomes RGB. Alpha is dropped, not composited (a transparent pixel
  keeps its stored colour); 16-bit greyscale is scaled to 8 bits (Pillow's own conversion clips);
  palette images go through RGBA so palette transparency converts cleanly; CMYK is converted by
  Pillow. EXIF orientation is not applied (as torchvision's ImageFolder).
- Evaluation geometry (`center_crop`): the shorter side is resized to ``resize`` (bilinear, Pillow's
  antialiasing), the longer in proportion rounded down, then the centre ``crop`` square is cut, as
  torchvision's ``Resize(resize)`` + ``CenterCrop(crop)``. Image folders use
  ``resize = eval_resize(size)``; the ratio `EVAL_RESIZE_RATIO` is written here only.
- Bounded memory, whatever the file: at most one full-size decoded image exists at a time
  (`open_image` shrinks it before the next file is opened), and a file decoding to more than
  `MAX_DECODED_PIXELS` is a UserError naming it. When the resized image would exceed
  `FULL_RESIZE_MAX_PIXELS` (aspect ratios beyond about 12:1 at the largest input sizes), only the
  source region under the centre crop is resized (Pillow's ``box``): same geometry, pixels within
  one grey level of the full resize (the box's floating-point scale differs in the last bits). Below
  that bound the pixels are exactly torchvision's.
- JPEG files are decoded at a reduced DCT scale (1/2, 1/4 or 1/8, Pillow's ``draft``) only when the
  reduced image is still at least `DRAFT_GAP` times the size it is resized to (Pillow's thumbnail
  rule), i.e. for JPEGs at least 4x larger per side than needed. Those pixels differ slightly from a
  full-resolution decode; every other file decodes exactly as before.
- Every failure to read a file is a UserError naming the file.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from distrain.errors import UserError

PathLike = Union[str, Path]

EVAL_RESIZE_RATIO = 1.14  # eval: shorter side to size*1.14, then the centre crop (224 -> 255)
MAX_DECODED_PIXELS = 89_478_485  # Pillow's default MAX_IMAGE_PIXELS (about 9459 x 9459)
FULL_RESIZE_MAX_PIXELS = 1 << 24  # above: resize only the crop's source region (48 MiB of RGB)
DRAFT_GAP = 2  # a reduced JPEG decode stays >= this times the resized size (as Image.thumbnail)


def eval_resize(size: int) -> int:
    """The shorter side an image-folder model's eval input is resized to before the centre crop."""
    return int(round(int(size) * EVAL_RESIZE_RATIO))


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """(w, h): the shorter side ``resize``, the longer in proportion, rounded down (torchvision)."""
    if width <= height:
        return resize, max(int(resize * height / width), resize)
    return max(int(resize * width / height), resize), resize


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as RGB (``img`` itself when it already is); the module docstring says how."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        # round(v / 257) in integers: the float formula exactly, in a quarter of its memory (I;16).
        arr = np.asarray(img).astype(np.int64 if mode == "I" else np.uint32)
        arr = np.clip((arr * 2 + 257) // 514, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if np.isfinite(arr).all() and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(arr) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode in ("P", "PA"):
        img = img.convert("RGBA")  # palette transparency converts cleanly only through RGBA
    if img.mode == "La":
        img = img.convert("LA")
    if img.mode == "RGBa":
        img = img.convert("RGBA")
    return img.convert("RGB")


def center_crop(img: Image.Image, resize: int, crop: int,
                size: Optional[tuple[int, int]] = None) -> Image.Image:
    """Shorter side to ``resize`` (bilinear), then the centre ``crop`` square.

    ``size`` is the original (width, height) when ``img`` is a reduced decode of it: the geometry is
    always that of the original, so a reduced decode changes pixels, never the framing.
    """
    width, height = size or img.size
    nw, nh = resized_size(width, height, resize)
    top = int(round((nh - crop) / 2.0))
    left = int(round((nw - crop) / 2.0))
    if img.size == (nw, nh):
        return img.crop((left, top, left + crop, top + crop))
    if nw * nh <= FULL_RESIZE_MAX_PIXELS:
        return img.resize((nw, nh), Image.BILINEAR).crop((left, top, left + crop, top + crop))
    sx, sy = img.width / nw, img.height / nh
    right, bottom = min((left + crop) * sx, img.width), min((top + crop) * sy, img.height)
    return img.resize((crop, crop), Image.BILINEAR, box=(left * sx, top * sy, right, bottom))


def to_uint8_chw(img: Image.Image) -> torch.Tensor:
    """An RGB image as a contiguous uint8 (3, H, W) tensor that owns its memory."""
    # np.array copies: PIL's buffer may be read-only, and CHW must own contiguous memory.
    return torch.from_numpy(np.array(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1), order="C"))


class ImageSource:
    """An opened image file: its original ``size``, and its pixels at the size needed."""

    def __init__(self, path: PathLike, img: Image.Image):
        self.path = path
        self._img = img
        self.size: tuple[int, int] = img.size  # as stored in the file, before any reduced decode

    def rgb(self, target: Optional[tuple[float, float]] = None) -> Image.Image:
        """The decoded RGB image, valid inside `open_image`'s block.

        ``target``: the size the whole image will be resized to; a large JPEG may then decode at a
        reduced scale (see the module docstring)."""
        img = self._img
        if target is not None:  # only JPEG (and MPO, cameras' JPEG) decoders act on a draft
            tw, th = (max(1, int(math.ceil(t * DRAFT_GAP))) for t in target)
            img.draft(None, (tw, th))
        w, h = img.size
        if w * h > MAX_DECODED_PIXELS:
            raise UserError(f"image '{self.path}' is {w}x{h} pixels, more than the "
                            f"{MAX_DECODED_PIXELS:,} distrain decodes (Pillow's MAX_IMAGE_PIXELS); "
                            f"shrink or delete it")
        img.load()  # decode now, inside open_image, so a truncated file fails naming itself
        rgb = to_rgb(img)
        rgb.load()
        return rgb

    def eval_crop(self, resize: int, crop: int) -> Image.Image:
        """The evaluation input: `center_crop` of the image, decoded no larger than needed."""
        nw, nh = resized_size(*self.size, resize)
        return center_crop(self.rgb((nw, nh)), resize, crop, size=self.size)

    def resized_region(self, box: tuple[int, int, int, int], out: tuple[int, int]) -> Image.Image:
        """Region ``box`` = (left, top, right, bottom) of the original image resized to ``out``."""
        left, top, right, bottom = box
        width, height = self.size
        img = self.rgb((width * out[0] / (right - left), height * out[1] / (bottom - top)))
        if img.size != self.size:
            sx, sy = img.width / width, img.height / height
            box = (left * sx, top * sy, min(right * sx, img.width), min(bottom * sy, img.height))
        return img.resize(out, Image.BILINEAR, box=box)


@contextlib.contextmanager
def open_image(path: PathLike) -> Iterator[ImageSource]:
    """Open ``path``; any failure to read it, here or in the block, is a UserError naming it.

    The decoded pixels belong to the block: take what you need (a crop, a resize) before it ends.
    """
    try:
        with warnings.catch_warnings():
            # Our own limit (MAX_DECODED_PIXELS) applies to what is decoded, after a reduced decode.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                yield ImageSource(path, img)
    except UserError:
        raise
    except UnidentifiedImageError:
        raise UserError(f"'{path}' is not an image file (its format is not one Pillow reads); "
                        f"convert it to PNG or JPEG, or delete it") from None
    except Exception as e:  # noqa: BLE001 - truncated data, DecompressionBombError, a plugin's
        raise UserError(f"cannot read image '{path}' ({type(e).__name__}: {e}); the file is "
                        f"damaged or truncated: fix or delete it") from None


def load_rgb(path: PathLike) -> Image.Image:
    """Decode ``path`` to a full-size RGB image (for callers that need every pixel)."""
    with open_image(path) as src:
        rgb = src.rgb()
        return rgb.copy() if rgb is src._img else rgb
