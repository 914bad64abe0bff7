"""`distrain predict`: any image file or folder, the same inputs as evaluation, top-k, --json, clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_distrain, smoke_args
from distrain import cli
from distrain.data.augment import Normalizer
from distrain.errors import UserError
from distrain.export import load_model
from distrain.predict import center_crop, expand_inputs, geometry, load_rgb, predict, preprocess, preprocess_batch

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """A tiny trained cifar10_quick on synthetic data (2 epochs, seconds)."""
    out = tmp_path_factory.mktemp("predict") / "run"
    run_distrain(["train", *smoke_args(out, **{"train.epochs": 2})], check=True)
    assert (out / "model.safetensors").is_file()
    return out


@pytest.fixture
def images(tmp_path) -> dict[str, Path]:
    """One file per mode/format/size users throw at it."""
    rng = np.random.default_rng(0)
    d = tmp_path / "imgs"
    d.mkdir()

    def rgb(h, w):
        return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)

    out = {}

    def save(name, img, **kw):
        out[name] = d / name
        img.save(out[name], **kw)

    save("rgb.png", Image.fromarray(rgb(40, 60)))
    rgba = Image.fromarray(rgb(33, 33)).convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (33, 33), dtype=np.uint8)))
    save("rgba.png", rgba)
    save("gray.jpg", Image.fromarray(rgb(50, 20)).convert("L"), quality=90)
    save("gray_alpha.png", Image.fromarray(rgb(20, 20)).convert("LA"))
    pal = Image.fromarray(rgb(24, 30)).convert("P", palette=Image.ADAPTIVE, colors=16)
    save("palette.png", pal, transparency=0)
    save("gray16.png", Image.fromarray(rng.integers(0, 65536, (30, 30), dtype=np.uint16)))
    save("cmyk.jpg", Image.fromarray(rgb(32, 32)).convert("CMYK"))
    save("bilevel.png", Image.fromarray(rgb(16, 16)).convert("1"))
    save("anim.gif", Image.fromarray(rgb(32, 32)).convert("P"))
    save("photo.bmp", Image.fromarray(rgb(32, 48)))
    save("photo.webp", Image.fromarray(rgb(64, 32)))
    save("photo.tiff", Image.fromarray(rgb(32, 32)))
    save("UPPER.JPEG", Image.fromarray(rgb(480, 640)))
    save("tiny.png", Image.fromarray(rgb(1, 1)))
    save("wide.png", Image.fromarray(rgb(17, 1000)))
    save("tall.jpg", Image.fromarray(rgb(1000, 17)))
    return out


def _check_result(r: dict, k: int, classes: int = 10) -> None:
    assert set(r) >= {"path", "class", "probability", "topk", "index"}
    probs = [c["probability"] for c in r["topk"]]
    assert len(r["topk"]) == min(k, classes)
    assert probs == sorted(probs, reverse=True) and all(0.0 <= p <= 1.0 for p in probs)
    assert sum(probs) <= 1.0 + 1e-5
    assert r["class"] == r["topk"][0]["class"] and r["probability"] == probs[0]
    assert len({c["index"] for c in r["topk"]}) == len(probs)


# -- preprocessing: exactly what evaluation fed the network ---------------------------------------------

def test_cifar_model_inputs_equal_the_eval_pipeline() -> None:
    from distrain.data.synthetic import make_synthetic

    x, _, _ = make_synthetic(train=False, seed=0, max_samples=8)
    info = {"input_size": [3, 32, 32], "resize": 32, "dataset": "synthetic", "mean": list(CIFAR_MEAN), "std": list(CIFAR_STD)}
    pil = [Image.fromarray(img.transpose(1, 2, 0)) for img in x]
    want = Normalizer(CIFAR_MEAN, CIFAR_STD, 32, "cpu")(torch.from_numpy(x))
    assert torch.equal(preprocess_batch(pil, info), want)
    # A network with a larger input (VGG at 64 px on CIFAR) gets the same on-tensor upsampling as in training.
    info64 = {**info, "input_size": [3, 64, 64], "resize": 64, "dataset": "cifar10"}
    assert geometry(info64) == (32, 32, 64)
    assert torch.equal(preprocess_batch(pil, info64), Normalizer(CIFAR_MEAN, CIFAR_STD, 64, "cpu")(torch.from_numpy(x)))
    assert torch.equal(preprocess(pil[0], info64), preprocess_batch(pil, info64)[0])


@pytest.mark.parametrize("size", [32, 64])
def test_imagefolder_model_inputs_equal_the_dataset_eval_transform(tmp_path, size: int) -> None:
    from distrain.config import Config
    from distrain.data.imagefolder import ImageFolderDataset, scan_imagefolder
    from distrain.export import model_info
    from fakes import write_image_folder

    write_image_folder(tmp_path, classes=("ants", "bees", "wasps"), per_class_train=1, per_class_val=4)
    paths, labels, classes = scan_imagefolder(str(tmp_path), "val")
    cfg = Config()
    cfg.data.name, cfg.model.input_size = "imagefolder", size
    info = model_info(cfg, classes, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    resize, crop, net = geometry(info)
    assert (crop, net) == (size, size) and resize == round(size * 1.14)
    ds = ImageFolderDataset(paths, labels, size=size, train=False, augment=False, seed=0)
    for i, p in enumerate(paths):  # every size and mode of the fake folder: RGB, RGBA, L, P; JPEG and PNG
        got = torch.from_numpy(np.asarray(center_crop(load_rgb(Path(p)), resize, crop)).transpose(2, 0, 1).copy())
        assert torch.equal(got, ds[i][0]), p


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path) -> None:
    v = np.arange(0, 256, dtype=np.uint16).reshape(16, 16)
    Image.fromarray(v.astype(np.uint8), "L").save(tmp_path / "g8.png")
    Image.fromarray(v * 257).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    a, b = np.asarray(load_rgb(tmp_path / "g8.png")), np.asarray(load_rgb(tmp_path / "g16.png"))
    assert np.array_equal(a, b)


def test_centre_crop_geometry() -> None:
    img = Image.new("RGB", (100, 50))
    assert center_crop(img, 32, 32).size == (32, 32)
    assert center_crop(Image.new("RGB", (1, 1)), 36, 32).size == (32, 32)
    assert center_crop(Image.new("RGB", (3, 900)), 32, 32).size == (32, 32)


def test_directories_expand_to_their_images(tmp_path) -> None:
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    for name in ("b.png", "a.JPG", "c.webp"):
        (d / name).write_bytes(b"x")
    (d / "notes.txt").write_text("not an image")
    (d / ".hidden.png").write_bytes(b"macOS resource fork")
    (d / "sub" / "deeper.png").write_bytes(b"x")  # not recursive
    single = tmp_path / "z.png"
    single.write_bytes(b"x")
    got = expand_inputs([str(single), str(d)])
    assert [p.name for p in got] == ["z.png", "a.JPG", "b.png", "c.webp"]


# -- predictions -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_every_kind_of_image(run_dir, images) -> None:
    files = sorted(images.values())
    res = predict(str(run_dir), [str(p) for p in files], topk=3, batch_size=4)
    assert [r["path"] for r in res] == [str(p) for p in files]  # input order, every file once
    for r in res:
        _check_result(r, 3)
    # Batching does not change anything.
    one = predict(str(run_dir), [str(p) for p in files], topk=3, batch_size=1)
    for a, b in zip(res, one):
        assert a["class"] == b["class"] and math.isclose(a["probability"], b["probability"], rel_tol=1e-4, abs_tol=1e-6)


@pytest.mark.slow
def test_predictions_match_the_model_and_eval(run_dir, tmp_path) -> None:
    """The test split saved as PNG files: predict gives the model's own outputs and eval's accuracy."""
    from distrain.data.synthetic import make_synthetic

    x, y, classes = make_synthetic(train=False, seed=0, max_samples=64)
    d = tmp_path / "test_pngs"
    d.mkdir()
    for i, img in enumerate(x):
        Image.fromarray(img.transpose(1, 2, 0)).save(d / f"{i:03d}_{classes[y[i]]}.png")
    res = predict(str(run_dir), [str(d)], topk=10, batch_size=64)
    assert len(res) == 64
    model = load_model(str(run_dir)).model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(Normalizer(CIFAR_MEAN, CIFAR_STD, 32, "cpu")(torch.from_numpy(x))), 1)
    for i, r in enumerate(res):
        assert r["index"] == int(probs[i].argmax())
        got = torch.tensor([c["probability"] for c in sorted(r["topk"], key=lambda c: c["index"])])
        assert torch.allclose(got, probs[i], atol=1e-5)
        assert r["class"] == classes[r["index"]]
    acc = float(np.mean([r["index"] == y[i] for i, r in enumerate(res)]))
    ev = run_distrain(["eval", "--checkpoint", str(run_dir), "--json"], check=True)
    assert json.loads(ev.stdout)["accuracy"] == pytest.approx(acc, abs=1e-9)


@pytest.mark.slow
def test_every_checkpoint_form_gives_the_same_answer(run_dir, images) -> None:
    files = [str(images["rgb.png"]), str(images["gray.jpg"])]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    answers = [predict(str(p), files, topk=2) for p in
               (run_dir, run_dir / "model.safetensors", run_dir / "checkpoints" / latest)]
    for other in answers[1:]:
        for a, b in zip(answers[0], other):
            assert a["class"] == b["class"] and math.isclose(a["probability"], b["probability"], rel_tol=1e-5)


@pytest.mark.slow
def test_topk_is_capped_at_the_number_of_classes(run_dir, images) -> None:
    (r,) = predict(str(run_dir), [str(images["rgb.png"])], topk=50)
    _check_result(r, 50)
    assert len(r["topk"]) == 10 and sum(c["probability"] for c in r["topk"]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_cli_human_output_goes_to_stderr(run_dir, images, capsys) -> None:
    rc = cli.main(["predict", "--checkpoint", str(run_dir), "--topk", "2", str(images["rgb.png"]), str(images["tiny.png"])])
    out, err = capsys.readouterr()
    assert rc == 0 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{images['rgb.png']}: ") and lines[1].startswith(f"{images['tiny.png']}: ")
    assert all(l.count(",") == 1 for l in lines)  # two classes each


@pytest.mark.slow
def test_json_is_the_only_thing_on_stdout(run_dir, images) -> None:
    d = images["rgb.png"].parent
    proc = run_distrain(["predict", "--checkpoint", str(run_dir), "--json", "--topk", "3", str(d)], check=True)
    doc = json.loads(proc.stdout)  # one object, nothing else
    assert proc.stdout.count("\n") == 1
    assert [r["path"] for r in doc["predictions"]] == [str(p) for p in expand_inputs([str(d)])]
    for r in doc["predictions"]:
        _check_result(r, 3)
    assert "Traceback" not in proc.stderr


# -- errors --------------------------------------------------------------------------------------------------

def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8)).save(good)
    txt = tmp_path / "notes.txt"
    txt.write_text("hello, not an image")
    fake = tmp_path / "fake.jpg"
    fake.write_text("a text file with an image extension")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    trunc = tmp_path / "truncated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(trunc)
    trunc.write_bytes(trunc.read_bytes()[:300])
    no_images = tmp_path / "no_images"
    no_images.mkdir()
    (no_images / "readme.md").write_text("x")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (8, 8)).save(mixed / "a.png")
    (mixed / "b.png").write_text("broken")
    return {
        "text file": ([str(good), str(txt)], str(txt)),
        "fake extension": ([str(fake)], str(fake)),
        "empty file": ([str(empty)], str(empty)),
        "truncated": ([str(trunc)], str(trunc)),
        "missing": ([str(tmp_path / "nope.png")], str(tmp_path / "nope.png")),
        "folder without images": ([str(no_images)], str(no_images)),
        "bad file in a folder": ([str(mixed)], str(mixed / "b.png")),
    }


@pytest.mark.slow
def test_unreadable_inputs_are_user_errors_naming_the_file(run_dir, tmp_path, capsys) -> None:
    for what, (inputs, culprit) in _bad_inputs(tmp_path).items():
        with pytest.raises(UserError) as e:
            predict(str(run_dir), inputs)
        assert culprit in str(e.value), what
        rc = cli.main(["predict", "--checkpoint", str(run_dir), "--json", *inputs])
        out, err = capsys.readouterr()
        assert rc == 2, what
        assert out == "", what  # no partial JSON
        assert err.startswith("distrain predict: error: ") and culprit in err and "Traceback" not in err, what
        assert err.count("\n") == 1


def test_bad_options_and_checkpoints(tmp_path, capsys) -> None:
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "weights.pt").write_bytes(b"\x80\x02}q\x00.")
    cases = [
        (["--checkpoint", str(tmp_path / "missing"), str(img)], "does not exist"),
        (["--checkpoint", str(tmp_path / "empty_dir"), str(img)], "neither model.safetensors nor a distrain checkpoint"),
        (["--checkpoint", str(tmp_path / "weights.pt"), str(img)], "is not a .safetensors file"),
        (["--checkpoint", str(tmp_path / "missing"), "--topk", "0", str(img)], "--topk must be >= 1"),
        (["--checkpoint", str(tmp_path / "missing"), "--batch-size", "0", str(img)], "--batch-size must be >= 1"),
    ]
    for args, message in cases:
        rc = cli.main(["predict", *args])
        out, err = capsys.readouterr()
        assert rc == 2 and out == "" and message in err and "Traceback" not in err, (args, err)


@pytest.mark.slow
def test_broken_export_is_named(run_dir, tmp_path, capsys) -> None:
    import shutil

    d = tmp_path / "copy"
    d.mkdir()
    shutil.copy(run_dir / "model.json", d / "model.json")
    (d / "model.safetensors").write_bytes((run_dir / "model.safetensors").read_bytes()[:1000])
    rc = cli.main(["predict", "--checkpoint", str(d), str(run_dir / "config.yaml")])
    _, err = capsys.readouterr()
    assert rc == 2 and str(d / "model.safetensors") in err and "not a valid safetensors file" in err
    info = json.loads((run_dir / "model.json").read_text())
    (d / "model.json").write_text(json.dumps({**info, "num_classes": 7}))
    shutil.copy(run_dir / "model.safetensors", d / "model.safetensors")
    rc = cli.main(["predict", "--checkpoint", str(d / "model.safetensors"), str(run_dir / "config.yaml")])
    _, err = capsys.readouterr()
    assert rc == 2 and "does not fit a cifar10_quick with 7 classes" in err
