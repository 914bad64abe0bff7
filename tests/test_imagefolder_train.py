"""Training on your own images (data.name=imagefolder): odd sizes and modes, 2-process sharding, bad inputs.

The network is cifar10_quick (32x32, seconds per run); VGG on image folders is covered in test_vgg.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from conftest import read_jsonl, run_distrain, smoke_args, traceback_of_ours
from fakes import write_image_folder

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CLASSES = ("ants", "bees", "wasps")


def _args(out: Path, root: Path, **over) -> list[str]:
    base = {"data.name": "imagefolder", "data.root": root, "model.num_classes": len(CLASSES),
            "data.max_train_samples": "null", "data.max_test_samples": "null", "train.batch_size": 4,
            "train.epochs": 2, "log.progress": "none", "data.num_workers": 1}
    base.update(over)
    return ["train", *smoke_args(out, **base)]


def _folder(tmp_path: Path, train: int = 7, val: int = 3) -> Path:
    return write_image_folder(tmp_path / "photos", classes=CLASSES, per_class_train=train, per_class_val=val)


def test_train_eval_predict_on_odd_images(tmp_path) -> None:
    root = _folder(tmp_path)  # 21 train / 9 val files: JPEG/PNG, RGB/RGBA/L/P, 17x23 .. 300x200
    out = tmp_path / "run"
    run_distrain(_args(out, root), check=True)
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["samples"] for m in metrics if m["event"] == "train"] == [21, 21]
    assert [m["samples"] for m in metrics if m["event"] == "eval"] == [9, 9]
    info = json.loads((out / "model.json").read_text())
    assert info["classes"] == list(CLASSES) and info["dataset"] == "imagefolder"
    assert info["mean"] == [0.485, 0.456, 0.406]  # photos: ImageNet statistics

    p = run_distrain(["eval", "--checkpoint", str(out), "--json"], check=True)
    res = json.loads(p.stdout)
    assert res["samples"] == 9 and set(res["per_class_accuracy"]) == set(CLASSES)

    odd = tmp_path / "odd"
    odd.mkdir()
    Image.new("RGBA", (5, 300), (10, 200, 30, 40)).save(odd / "tall.png")
    Image.new("L", (640, 7), 99).save(odd / "wide.jpg")
    Image.new("P", (33, 33)).save(odd / "palette.png")
    val_file = sorted((root / "val" / "wasps").iterdir())[0]
    p = run_distrain(["predict", "--checkpoint", str(out / "model.safetensors"), "--json", "--topk", "3",
                      str(odd), str(val_file)], check=True)
    preds = json.loads(p.stdout)["predictions"]
    assert len(preds) == 4 and preds[-1]["path"] == str(val_file)
    for r in preds:  # class names from the folders
        assert r["class"] in CLASSES and sorted(t["class"] for t in r["topk"]) == sorted(CLASSES)


def test_two_processes_count_every_image_exactly_once(tmp_path) -> None:
    """21 train images, global batch 8 (last batch split 3/2), 9 val images over 2 ranks: exact counts and coverage."""
    root = _folder(tmp_path)
    out = tmp_path / "run"
    run_distrain(_args(out, root, **{"log.trace_samples": "true"}), nprocs=2, check=True)
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["samples"] for m in metrics if m["event"] == "train"] == [21, 21]
    assert [m["samples"] for m in metrics if m["event"] == "eval"] == [9, 9]
    trace = out / "trace"
    for epoch in (0, 1):
        used = []
        for f in sorted(trace.glob(f"train-epoch{epoch}-from0-rank*.json")):
            used += [i for micro in json.loads(f.read_text()) for i in micro]
        assert sorted(used) == list(range(21)), epoch  # each training image once per epoch
        seen = []
        for f in sorted(trace.glob(f"eval-epoch{epoch}-rank*.json")):
            seen += json.loads(f.read_text())
        assert sorted(seen) == list(range(9)), epoch  # each test image once
    assert len(list(trace.glob("train-epoch0-from0-rank*.json"))) == 2


@pytest.mark.parametrize("nprocs", [1, 2])
def test_unreadable_file_is_named_on_every_rank(tmp_path, nprocs) -> None:
    root = _folder(tmp_path, train=3, val=2)
    bad = root / "train" / "bees" / "zz_broken.jpg"
    bad.write_bytes(b"this is not a JPEG")
    p = run_distrain(_args(tmp_path / "run", root), nprocs=nprocs, timeout=200)
    if nprocs == 1:
        assert p.returncode == 2 and str(bad) in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
        return
    # Checked before training (rank 0) and agreed: every rank names it and exits 2, none hangs. The launcher
    # prints its own report; no traceback of ours.
    assert p.returncode != 0
    for r in range(2):
        lines = [l for l in p.stderr.splitlines() if l.startswith(f"[rank {r}] distrain train: error: ")]
        assert len(lines) == 1 and str(bad) in lines[0], p.stderr[-3000:]
    assert not traceback_of_ours(p.stderr), p.stderr[-3000:]
    assert len(re.findall(r"^\s*exitcode\s*:\s*2\b", p.stderr, re.M)) == 2, p.stderr[-3000:]


def test_truncated_file_found_while_training_is_named_in_one_line(tmp_path) -> None:
    """data.verify=false skips the header check; the decode error inside a loader worker still reads clean."""
    root = _folder(tmp_path, train=3, val=2)
    src = sorted((root / "train" / "ants").glob("*.png"))[0]
    bad = root / "train" / "ants" / "truncated.png"
    bad.write_bytes(src.read_bytes()[:80])  # a valid header, cut data
    p = run_distrain(_args(tmp_path / "run", root, **{"data.verify": "false"}))
    assert p.returncode == 2, p.stderr[-3000:]
    lines = [l for l in p.stderr.splitlines() if "error:" in l]
    assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in p.stderr


def test_empty_class_and_differing_classes_are_named(tmp_path) -> None:
    root = _folder(tmp_path, train=2, val=1)
    empty = root / "train" / "cicadas"
    empty.mkdir()
    p = run_distrain(_args(tmp_path / "run1", root))
    assert p.returncode == 2 and str(empty) in p.stderr and "Traceback" not in p.stderr

    Image.new("RGB", (20, 20), (1, 2, 3)).save(empty / "one.png")  # now train has a class val lacks
    p = run_distrain(_args(tmp_path / "run2", root))
    assert p.returncode == 2 and "cicadas" in p.stderr and "only in train" in p.stderr
