"""Image folders: scanning, decoding any mode/size to RGB, eval crops, seeded augmentation, bad inputs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from distrain.data.imagefolder import (ImageFolderDataset, check_same_classes, eval_transform, load_image_rgb,
                                       scan_imagefolder)
from distrain.errors import UserError
from fakes import write_image_folder


# -- scanning ------------------------------------------------------------------------------------

def test_scan_lists_classes_and_files(tmp_path) -> None:
    write_image_folder(tmp_path, classes=("bees", "ants", "wasps"), per_class_train=4, per_class_val=2)
    paths, labels, classes = scan_imagefolder(str(tmp_path), "train")
    assert classes == ["ants", "bees", "wasps"]
    assert labels.dtype == np.int64 and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for p, y in zip(paths, labels):
        assert os.path.basename(os.path.dirname(p)) == classes[y]
    for k in range(3):
        group = [p for p, y in zip(paths, labels) if y == k]
        assert group == sorted(group)
    vpaths, vlabels, vclasses = scan_imagefolder(str(tmp_path), "val")
    assert vclasses == classes and len(vpaths) == 6
    check_same_classes(classes, vclasses)


def test_scan_ignores_non_images_and_finds_nested_and_uppercase(tmp_path) -> None:
    write_image_folder(tmp_path, per_class_train=2, per_class_val=1)
    ants = tmp_path / "train" / "ants"
    (ants / "notes.txt").write_text("not an image")
    (ants / "labels.csv").write_text("a,b")
    (ants / "._resource_fork.jpg").write_bytes(b"\x00\x05\x16\x07")  # macOS junk with an image extension
    (ants / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(ants / ".hidden" / "x.png")
    (ants / "nested").mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(ants / "nested" / "deep.PNG")
    Image.new("RGB", (8, 8)).save(ants / "upper.JPG", format="JPEG")
    Image.new("RGB", (8, 8)).save(ants / "pic.bmp")
    Image.new("RGB", (8, 8)).save(ants / "pic.webp")
    (tmp_path / "train" / ".git").mkdir()  # hidden folders are not classes
    paths, labels, classes = scan_imagefolder(str(tmp_path), "train")
    assert classes == ["ants", "bees"]
    names = [os.path.relpath(p, ants) for p, y in zip(paths, labels) if y == 0]
    assert sorted(names) == sorted(["ants_000.jpg", "ants_001.png", os.path.join("nested", "deep.PNG"),
                                    "upper.JPG", "pic.bmp", "pic.webp"])
    for p in paths:
        load_image_rgb(p)


def test_missing_split(tmp_path) -> None:
    write_image_folder(tmp_path)
    with pytest.raises(UserError) as e:
        scan_imagefolder(str(tmp_path), "test")
    assert str(tmp_path / "test") in str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        scan_imagefolder(str(tmp_path / "nowhere"), "train")


def test_no_class_folders(tmp_path) -> None:
    (tmp_path / "train").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "loose.png")
    with pytest.raises(UserError, match="no class folders") as e:
        scan_imagefolder(str(tmp_path), "train")
    assert str(tmp_path / "train") in str(e.value)


def test_empty_class_is_named(tmp_path) -> None:
    write_image_folder(tmp_path)
    empty = tmp_path / "train" / "cicadas"
    empty.mkdir()
    (empty / "readme.txt").write_text("nothing here")
    with pytest.raises(UserError, match="no images") as e:
        scan_imagefolder(str(tmp_path), "train")
    assert str(empty) in str(e.value)


def test_class_sets_differ() -> None:
    with pytest.raises(UserError) as e:
        check_same_classes(["ants", "bees", "moths"], ["ants", "bees", "wasps", "flies"])
    msg = str(e.value)
    assert "only in train: moths" in msg and "only in val: flies, wasps" in msg
    with pytest.raises(UserError, match="only in val: c"):
        check_same_classes(["a", "b"], ["a", "b", "c"])
    check_same_classes(["b", "a"], ["a", "b"])


# -- decoding ------------------------------------------------------------------------------------

def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return str(path)


@pytest.mark.parametrize(
    "make, fmt",
    [
        (lambda: Image.new("RGB", (17, 23), (200, 10, 10)), "JPEG"),
        (lambda: Image.new("RGBA", (300, 200), (10, 200, 10, 0)), "PNG"),
        (lambda: Image.new("L", (5, 40), 77), "PNG"),
        (lambda: Image.new("LA", (9, 9), (77, 20)), "PNG"),
        (lambda: Image.new("RGB", (30, 30), (10, 20, 200)).convert("P"), "PNG"),
        (lambda: Image.new("RGB", (30, 30), (10, 20, 200)).convert("P"), "BMP"),
        (lambda: Image.new("1", (33, 7), 1), "BMP"),
        (lambda: Image.new("CMYK", (12, 12), (0, 255, 255, 0)), "JPEG"),
        (lambda: Image.new("RGB", (12, 12), (1, 2, 3)), "WEBP"),
        (lambda: Image.new("RGBA", (12, 12), (1, 2, 3, 4)), "WEBP"),
    ],
)
def test_any_mode_loads_as_rgb(tmp_path, make, fmt: str) -> None:
    img = make()
    path = _save(img, tmp_path / f"x.{fmt.lower()}", format=fmt)
    rgb = load_image_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == img.size


def test_alpha_is_dropped_not_composited(tmp_path) -> None:
    path = _save(Image.new("RGBA", (4, 4), (200, 100, 50, 0)), tmp_path / "a.png")
    assert load_image_rgb(path).getpixel((0, 0)) == (200, 100, 50)


def test_palette_with_transparency(tmp_path) -> None:
    img = Image.new("P", (6, 6), 3)
    img.putpalette([i % 256 for i in range(768)])
    img.info["transparency"] = bytes([0] * 3 + [255] * 253)
    path = _save(img, tmp_path / "p.png", transparency=3)
    rgb = load_image_rgb(path)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (9, 10, 11)


def test_16_bit_greyscale_is_scaled(tmp_path) -> None:
    arr = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(arr), tmp_path / "g16.png")
    with Image.open(path) as img:
        assert img.mode.startswith("I")
    rgb = np.asarray(load_image_rgb(path))
    assert rgb[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("content", ["garbage", "truncated", "empty"])
def test_unreadable_file_is_named(tmp_path, content: str) -> None:
    path = tmp_path / "broken.jpg"
    if content == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(2000))
    elif content == "empty":
        path.write_bytes(b"")
    else:
        arr = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
        Image.fromarray(arr).save(path, format="JPEG")
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError) as e:
        load_image_rgb(str(path))
    assert str(path) in str(e.value)


def test_dataset_names_the_unreadable_file(tmp_path) -> None:
    write_image_folder(tmp_path, per_class_train=2, per_class_val=1)
    bad = tmp_path / "train" / "bees" / "zz_bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    paths, labels, _ = scan_imagefolder(str(tmp_path), "train")
    ds = ImageFolderDataset(paths, labels, size=16, train=True, augment=True, seed=0)
    with pytest.raises(UserError, match="zz_bad.png"):
        ds[len(ds) - 1]


# -- dataset -------------------------------------------------------------------------------------

@pytest.mark.parametrize("train, augment", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("size", [32, 7])
def test_items_are_uint8_squares(tmp_path, train: bool, augment: bool, size: int) -> None:
    write_image_folder(tmp_path, per_class_train=6, per_class_val=3)
    paths, labels, _ = scan_imagefolder(str(tmp_path), "train")
    ds = ImageFolderDataset(paths, labels, size=size, train=train, augment=augment, seed=0)
    assert len(ds) == 12
    for i in range(len(ds)):
        x, y, idx = ds[i]
        assert isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.shape == (3, size, size)
        assert x.is_contiguous()
        assert y == int(labels[i]) and isinstance(y, int) and idx == i


def test_eval_transform_matches_torchvision(tmp_path) -> None:
    from torchvision import transforms

    rng = np.random.default_rng(0)
    for w, h in [(300, 200), (17, 23), (64, 64), (200, 301), (500, 120)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for size in (32, 224):
            ref = transforms.Compose([transforms.Resize(round(size * 1.14)), transforms.CenterCrop(size)])(img)
            ours = eval_transform(img, size)
            assert ours.size == (size, size)
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def test_eval_ignores_epoch_and_is_learnable_colour(tmp_path) -> None:
    write_image_folder(tmp_path, per_class_train=4, per_class_val=4)
    paths, labels, _ = scan_imagefolder(str(tmp_path), "val")
    ds = ImageFolderDataset(paths, labels, size=24, train=False, augment=True, seed=0)
    a = torch.stack([ds[i][0] for i in range(len(ds))])
    ds.set_epoch(5)
    b = torch.stack([ds[i][0] for i in range(len(ds))])
    assert torch.equal(a, b)
    # Class-dependent brightness survives every mode (greyscale included).
    means = a.float().mean(dim=(1, 2, 3))
    lab = torch.as_tensor(labels)
    assert means[lab == 0].max() < means[lab == 1].min()


def _augmented(paths, labels, seed: int, epoch: int, order) -> dict[int, torch.Tensor]:
    ds = ImageFolderDataset(paths, labels, size=20, train=True, augment=True, seed=seed)
    ds.set_epoch(epoch)
    return {i: ds[i][0] for i in order}


def test_augmentation_is_a_function_of_seed_epoch_index(tmp_path) -> None:
    write_image_folder(tmp_path, per_class_train=6, per_class_val=1)
    paths, labels, _ = scan_imagefolder(str(tmp_path), "train")
    n = len(paths)
    torch.manual_seed(123)
    a = _augmented(paths, labels, seed=0, epoch=1, order=range(n))
    torch.manual_seed(999)  # the global RNG plays no part
    np.random.seed(5)
    b = _augmented(paths, labels, seed=0, epoch=1, order=reversed(range(n)))  # any order, fresh instance
    assert all(torch.equal(a[i], b[i]) for i in range(n))

    other_epoch = _augmented(paths, labels, seed=0, epoch=2, order=range(n))
    other_seed = _augmented(paths, labels, seed=1, epoch=1, order=range(n))
    assert sum(not torch.equal(a[i], other_epoch[i]) for i in range(n)) >= n // 2
    assert sum(not torch.equal(a[i], other_seed[i]) for i in range(n)) >= n // 2

    # The epoch can travel with the index, for DataLoader workers that never see set_epoch.
    ds = ImageFolderDataset(paths, labels, size=20, train=True, augment=True, seed=0)
    for i in range(n):
        x, y, idx = ds[(2, i)]
        assert torch.equal(x, other_epoch[i]) and idx == i and y == int(labels[i])


def test_augmentation_does_not_depend_on_the_worker(tmp_path) -> None:
    write_image_folder(tmp_path, per_class_train=4, per_class_val=1)
    paths, labels, _ = scan_imagefolder(str(tmp_path), "train")
    ds = ImageFolderDataset(paths, labels, size=16, train=True, augment=True, seed=3)
    ds.set_epoch(4)
    direct = torch.stack([ds[i][0] for i in range(len(ds))])
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, shuffle=False,
                                         multiprocessing_context="fork" if os.name == "posix" else None)
    batches = [b for b in loader]
    assert torch.equal(torch.cat([b[0] for b in batches]), direct)
    assert torch.cat([b[2] for b in batches]).tolist() == list(range(len(ds)))


def test_augmentation_crops_and_flips(tmp_path) -> None:
    # A left-dark/right-bright image: some epochs flip it, and crops change what is seen.
    arr = np.zeros((60, 90, 3), dtype=np.uint8)
    arr[:, 45:] = 255
    arr[:30, :, 1] = 128
    path = _save(Image.fromarray(arr), tmp_path / "half.png")
    ds = ImageFolderDataset([path], np.array([0]), size=16, train=True, augment=True, seed=0)
    outs = []
    for epoch in range(12):
        ds.set_epoch(epoch)
        outs.append(ds[0][0].float())
    flipped = [bool(o[:, :, :4].mean() > o[:, :, -4:].mean()) for o in outs]
    assert any(flipped) and not all(flipped)
    assert len({o.numpy().tobytes() for o in outs}) == len(outs)


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError):
        ImageFolderDataset(["a.png"], np.array([0, 1]), size=8, train=True, augment=False, seed=0)
    with pytest.raises(UserError):
        ImageFolderDataset(["a.png"], np.array([0]), size=0, train=True, augment=False, seed=0)
