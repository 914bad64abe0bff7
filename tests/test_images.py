"""distrain.images: the old pixels for ordinary files, bounded memory whatever the file."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import subprocess_env
from distrain import images
from distrain.data.imagefolder import (ImageFolderDataset, eval_transform, load_image_rgb,
                                       train_transform)
from distrain.errors import UserError
from distrain.images import center_crop, eval_resize, open_image, to_rgb

RNG = np.random.default_rng(0)


def _noise(w: int, h: int) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _torchvision_eval(img: Image.Image, resize: int, crop: int) -> np.ndarray:
    from torchvision import transforms

    reference = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop)])
    return np.asarray(reference(img))


@pytest.mark.parametrize("w, h", [(1, 1), (3, 600), (600, 3), (37, 1000), (640, 480), (255, 255)])
@pytest.mark.parametrize("size", [32, 224])
def test_eval_crop_is_torchvision_pixel_for_pixel(w: int, h: int, size: int) -> None:
    img = _noise(w, h)
    nw, nh = images.resized_size(w, h, eval_resize(size))
    assert nw * nh <= images.FULL_RESIZE_MAX_PIXELS  # up to 200:1 at 224 px: the full-resize path
    got = np.asarray(center_crop(img, eval_resize(size), size))
    np.testing.assert_array_equal(got, _torchvision_eval(img, eval_resize(size), size))


@pytest.mark.parametrize("w, h, resize, crop", [(50, 524, 36, 32), (627, 250, 255, 224),
                                                (7, 2000, 36, 32), (3000, 11, 73, 64)])
def test_region_resize_keeps_the_geometry_within_one_level(monkeypatch, w, h, resize, crop) -> None:
    """Above FULL_RESIZE_MAX_PIXELS only the crop's source region is resized: same framing, +-1."""
    img = _noise(w, h)
    want = _torchvision_eval(img, resize, crop).astype(int)
    monkeypatch.setattr(images, "FULL_RESIZE_MAX_PIXELS", 0)
    got = np.asarray(center_crop(img, resize, crop)).astype(int)
    assert got.shape == want.shape and np.abs(got - want).max() <= 1


def test_16_bit_scaling_is_the_float_formula_for_every_value() -> None:
    v = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    want = np.clip(v / 257.0 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(v)))[..., 0], want)
    i32 = np.array([[-(2**31), -129, -128, -1, 0, 128, 65535, 65536, 2**31 - 1]], dtype=np.int32)
    want = np.clip(i32 / 257.0 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(i32, mode="I")))[..., 0], want)


def test_dataset_items_equal_decode_then_transform(tmp_path) -> None:
    """Region-first dataset items are the old pixels (JPEGs under 4x the size needed: in full)."""
    files = []
    for i, (w, h, fmt) in enumerate([(300, 200, "PNG"), (17, 23, "JPEG"), (200, 301, "PNG"),
                                     (60, 100, "JPEG"), (64, 64, "BMP")]):
        files.append(tmp_path / f"{i}.{fmt.lower()}")
        _noise(w, h).save(files[-1], format=fmt)
    files.append(tmp_path / "p.png")
    _noise(40, 30).convert("P").save(files[-1])
    files.append(tmp_path / "g16.png")
    Image.fromarray(RNG.integers(0, 65536, (33, 47), dtype=np.uint16)).save(files[-1])
    paths = [str(p) for p in files]
    for size in (16, 32):
        labels = [0] * len(paths)
        ev = ImageFolderDataset(paths, labels, size=size, train=False, augment=False, seed=0)
        tr = ImageFolderDataset(paths, labels, size=size, train=True, augment=True, seed=3)
        for i, p in enumerate(paths):
            full = load_image_rgb(p)
            old = eval_transform(full, size)
            assert np.array_equal(ev[i][0].permute(1, 2, 0).numpy(), np.asarray(old)), p
            old = train_transform(full, size, tr.item_generator(0, i))
            assert np.array_equal(tr[i][0].permute(1, 2, 0).numpy(), np.asarray(old)), p


def _gradient_jpeg(path: Path, w: int, h: int) -> Path:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    arr = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.broadcast_to((x + y) / 2, (h, w, 1))], axis=2).astype(np.uint8)
    Image.fromarray(arr).save(path, quality=95)
    return path


def test_large_jpeg_decodes_reduced_only_when_4x_larger_than_needed(tmp_path) -> None:
    big = _gradient_jpeg(tmp_path / "big.jpg", 2400, 1600)
    with open_image(big) as src:
        assert src.size == (2400, 1600)
        assert src.rgb((54, 36)).size == (300, 200)  # 1/8 scale: still >= 2x the 54x36 needed
    with open_image(big) as src:
        assert src.rgb((800, 534)).size == (2400, 1600)  # only 3x larger: decoded in full
    with open_image(big) as src:
        reduced = np.asarray(src.eval_crop(36, 32)).astype(int)
    full = np.asarray(center_crop(load_image_rgb(big), 36, 32)).astype(int)
    assert reduced.shape == full.shape and np.abs(reduced - full).mean() < 2.0  # smooth: close


def _png_header_only(path: Path, w: int, h: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("w, h", [(10_000, 10_000), (40_000, 40_000)])
def test_too_many_pixels_is_a_user_error_naming_the_file(tmp_path, w: int, h: int) -> None:
    path = _png_header_only(tmp_path / "huge.png", w, h)
    with pytest.raises(UserError, match="huge.png"):
        with open_image(path) as src:
            src.eval_crop(36, 32)


def _max_rss_mb(args: list[str], tmp_path: Path) -> tuple[float, subprocess.CompletedProcess]:
    """Peak RSS of `distrain <args>`, measured by a fresh parent that has no other children."""
    probe = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
             "sys.exit(p.returncode)")
    cmd = [sys.executable, "-c", probe, sys.executable, "-m", "distrain", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path,
                          timeout=240)
    lines = proc.stdout.strip().splitlines()
    return int(lines[-1]) / 1024, proc


@pytest.fixture
def model_dir(tmp_path) -> Path:
    from distrain.config import Config
    from distrain.export import export_model, model_info
    from distrain.models import build_model

    cfg = Config()
    cfg.data.name = "synthetic"
    d = tmp_path / "model"
    d.mkdir()
    torch.manual_seed(0)
    sd = build_model("cifar10_quick", num_classes=10).state_dict()
    export_model(d, sd, model_info(cfg, [f"c{i}" for i in range(10)], (0.5,) * 3, (0.25,) * 3))
    return d


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_predict_memory_does_not_grow_with_the_image(tmp_path, model_dir) -> None:
    small = tmp_path / "small.png"
    Image.new("RGB", (8, 8), (9, 9, 9)).save(small)
    base, proc = _max_rss_mb(["predict", "--checkpoint", str(model_dir), str(small)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    cases = {"1x300000": (1, 300_000), "1x3000000": (1, 3_000_000)}
    for name, (w, h) in cases.items():  # a few KB of PNG each; resized in full they need GBs
        Image.new("L", (w, h), 200).save(tmp_path / f"{name}.png")
    photo = _gradient_jpeg(tmp_path / "photo.jpg", 6000, 4000)
    runs = {name: [str(tmp_path / f"{name}.png")] for name in cases}
    runs["24 camera photos"] = [str(photo)] * 24  # 1.7 GB if the batch were held decoded
    for name, files in runs.items():
        args = ["predict", "--checkpoint", str(model_dir), "--json", *files]
        peak, proc = _max_rss_mb(args, tmp_path)
        assert proc.returncode == 0, (name, proc.stderr)
        assert peak - base < 250, f"{name}: {peak:.0f} MB peak, {base:.0f} MB for an 8x8 image"


def test_image_folder_symlink_loops_and_repeated_links_count_each_file_once(tmp_path) -> None:
    from distrain.data.imagefolder import scan_imagefolder
    from fakes import write_image_folder

    write_image_folder(tmp_path, classes=("a", "b"), per_class_train=3, per_class_val=1)
    a = tmp_path / "train" / "a"
    (a / "loop").symlink_to(".")  # the loop of the report: 6 files counted as 126
    (a / "up").symlink_to("..")  # into the split: class b's files must not become class a's
    (a / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(a / "sub" / "x.png")
    (a / "sub_again").symlink_to("sub")
    elsewhere = tmp_path / "shared"
    elsewhere.mkdir()
    Image.new("RGB", (8, 8)).save(elsewhere / "y.png")
    (tmp_path / "train" / "b" / "shared").symlink_to(elsewhere)  # an ordinary linked folder counts
    paths, labels, classes = scan_imagefolder(str(tmp_path), "train")
    assert classes == ["a", "b"] and labels.tolist() == [0] * 4 + [1] * 4
    assert len({os.path.realpath(p) for p in paths}) == len(paths) == 8
    assert os.path.join(str(tmp_path / "train" / "b" / "shared"), "y.png") in paths
