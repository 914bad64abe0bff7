"""TensorBoard tells the story of a run: read the event files back as TensorBoard itself would."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import read_jsonl, run_distrain, smoke_args
from distrain.metrics import MetricsLogger

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load_events(tb_dir: Path) -> EventAccumulator:
    ea = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def png(event) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


def text_of(ea: EventAccumulator, tag: str) -> str:
    return ea.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


# -- MetricsLogger on its own ---------------------------------------------------------------------------

def test_logger_methods_write_readable_events(tmp_path) -> None:
    from distrain.config import Config

    m = MetricsLogger(tmp_path, enabled=True, tensorboard=True)
    m.scalars(1, **{"train/loss": 2.0, "train/lr": torch.tensor(0.1), "skip": None})
    m.scalars(2, **{"train/loss": float("nan")})  # a diverged run is shown, not a crash
    m.config(Config())
    m.text("run", "hello")
    x = torch.randn(5, 3, 8, 8)
    m.image_grid("train/augmented_batch", x, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    cm = torch.tensor([[3, 1, 0], [0, 0, 0], [1, 0, 5]])
    m.confusion(7, cm, ["a", "b c", "d/e"])
    m.gpu_memory(7, "cpu")  # nothing on a CPU
    m.hparams({"lr": 0.1, "name": "x", "flag": True, "odd": [1, 2]}, {"hparam/final_accuracy": 0.8, "hparam/none": None})
    m.close()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["tb"]
    assert not [p for p in (tmp_path / "tb").iterdir() if p.is_dir()]  # hparams in the same run, no sub-run
    ea = load_events(tmp_path / "tb")
    tags = ea.Tags()
    assert {"train/loss", "train/lr", "eval_per_class/a", "eval_per_class/d_e", "hparam/final_accuracy"} <= set(tags["scalars"])
    assert "eval_per_class/b_c" not in tags["scalars"]  # a class without images has no accuracy
    assert [e.value for e in ea.Scalars("eval_per_class/a")] == [0.75]
    assert np.isnan(ea.Scalars("train/loss")[-1].value)
    assert not any(t.startswith("gpu/") for t in tags["scalars"])
    assert set(tags["images"]) == {"train/augmented_batch", "eval/confusion_matrix"}
    grid = png(ea.Images("train/augmented_batch")[0])
    assert grid.shape == (2 + 2 * 10, 2 + 3 * 10, 3)  # 5 images of 8x8 in a 3-wide grid, 2 px padding
    assert ea.Images("eval/confusion_matrix")[0].step == 7
    assert "output_dir: runs/default" in text_of(ea, "config")
    assert text_of(ea, "run") == "hello"
    content = ea.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(content)
    assert b"hparam/final_accuracy" in content["_hparams_/experiment"] and b"lr" in content["_hparams_/experiment"]


def test_disabled_logger_writes_nothing(tmp_path) -> None:
    for enabled, tb in ((False, True), (True, False)):
        d = tmp_path / f"{enabled}-{tb}"
        d.mkdir()
        m = MetricsLogger(d, enabled=enabled, tensorboard=tb)
        m.scalars(1, loss=1.0)
        m.image_grid("x", torch.zeros(2, 3, 4, 4), (0, 0, 0), (1, 1, 1))
        m.confusion(1, torch.eye(2, dtype=torch.long), ["a", "b"])
        m.hparams({"a": 1}, {"m": 1.0})
        m.text("t", "x")
        m.close()
        assert not (d / "tb").exists()


# -- a real run -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tb_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tbrun") / "run"
    args = smoke_args(out, **{"train.epochs": 2, "log.tensorboard": "true", "data.augment": "false",
                              "log.every_steps": 2, "train.seed": 3})
    run_distrain(["train", *args], check=True)
    return out


@pytest.mark.slow
def test_run_scalars(tb_run) -> None:
    ea = load_events(tb_run / "tb")
    scalars = set(ea.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/images_per_s", "train/epoch_loss", "train/epoch_accuracy",
                "eval/loss", "eval/accuracy", "hparam/final_accuracy", "hparam/best_accuracy", "hparam/final_loss"):
        assert tag in scalars, tag
    assert {f"eval_per_class/{c}" for c in CLASSES} <= scalars
    # Train loss per log interval (every 2 of 16 steps), eval per epoch, at the global step.
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(2, 17, 2))
    assert [e.step for e in ea.Scalars("eval/accuracy")] == [8, 16]
    evals = [r for r in read_jsonl(tb_run / "metrics.jsonl") if r["event"] == "eval"]
    assert [e.value for e in ea.Scalars("eval/accuracy")] == pytest.approx([r["accuracy"] for r in evals])
    assert ea.Scalars("hparam/final_accuracy")[-1].value == pytest.approx(evals[-1]["accuracy"])
    lrs = [e.value for e in ea.Scalars("train/lr")]
    assert lrs[0] > lrs[-1]  # the cosine schedule is visible
    # Per-class accuracies agree with the overall accuracy (weighted by the class counts of the test split).
    from distrain.data.synthetic import make_synthetic

    _, y, _ = make_synthetic(train=False, seed=3, max_samples=64)
    counts = np.bincount(y, minlength=10)
    per = np.array([ea.Scalars(f"eval_per_class/{c}")[-1].value if counts[i] else 0.0 for i, c in enumerate(CLASSES)])
    assert (per * counts).sum() / counts.sum() == pytest.approx(evals[-1]["accuracy"], abs=1e-6)


@pytest.mark.slow
def test_run_images(tb_run) -> None:
    ea = load_events(tb_run / "tb")
    assert set(ea.Tags()["images"]) == {"train/augmented_batch", "eval/confusion_matrix"}
    grids = ea.Images("train/augmented_batch")
    assert len(grids) == 1 and grids[0].step == 0  # once per run
    # The grid holds the first training batch, de-normalised back to the original pixels.
    from torchvision.utils import make_grid

    from distrain.data.sampling import EpochPlan
    from distrain.data.synthetic import make_synthetic

    x, _, _ = make_synthetic(train=True, seed=3, max_samples=256)
    first = EpochPlan(256, 32, 1, 0, 1, 3, 0).micro_indices(0)
    expected = make_grid(torch.from_numpy(x[first.numpy()]).float() / 255, nrow=6, padding=2, pad_value=1.0)
    expected = (expected.permute(1, 2, 0).numpy() * 255).round()
    got = png(grids[0]).astype(np.float64)
    assert got.shape == expected.shape == (6 * 34 + 2, 6 * 34 + 2, 3)
    assert np.abs(got - expected).max() <= 1.0
    cms = ea.Images("eval/confusion_matrix")
    assert [e.step for e in cms] == [8, 16]
    img = png(cms[-1])
    assert img.shape[0] > 200 and img.shape[1] > 200 and img.std() > 10  # a real picture, not a blank


@pytest.mark.slow
def test_run_text_and_hparams(tb_run) -> None:
    ea = load_events(tb_run / "tb")
    config = text_of(ea, "config")
    assert "data:" in config and "name: synthetic" in config and "augment: false" in config
    run = text_of(ea, "run")
    assert "world size 1" in run and "global 32" in run
    content = ea.PluginTagToContent("hparams")
    exp = content["_hparams_/experiment"]
    for name in (b"train.lr", b"train.batch_size", b"model.name", b"run.world_size", b"run.precision",
                 b"hparam/final_accuracy", b"hparam/best_accuracy"):
        assert name in exp, name
    assert b"output_dir" not in exp and b"data.root" not in exp  # paths do not belong in the HPARAMS table
    assert not [p for p in (tb_run / "tb").iterdir() if p.is_dir()]


@pytest.mark.slow
def test_tensorboard_off_writes_no_events(tmp_path) -> None:
    out = tmp_path / "run"
    run_distrain(["train", *smoke_args(out, **{"data.max_train_samples": 64})], check=True)  # log.tensorboard=false
    assert not (out / "tb").exists() or not list((out / "tb").rglob("events.*"))
    assert (out / "metrics.jsonl").is_file()


def test_gpu_memory_scalars_on_cuda(tmp_path, monkeypatch) -> None:
    """On CUDA the logger records allocated, peak and reserved memory (faked here: no GPU needed)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 3 * 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: 5 * 2**20)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 8 * 2**20)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: calls.append(d))
    m = MetricsLogger(tmp_path, enabled=True, tensorboard=True)
    m.gpu_memory(10, torch.device("cuda", 0))
    m.close()
    ea = load_events(tmp_path / "tb")
    got = {t: ea.Scalars(t)[0].value for t in ea.Tags()["scalars"]}
    assert got == {"gpu/memory_allocated_mib": 3.0, "gpu/max_memory_allocated_mib": 5.0, "gpu/memory_reserved_mib": 8.0}
    assert len(calls) == 1  # the peak is per log interval
