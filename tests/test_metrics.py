"""metrics.jsonl records, confusion matrices, per-class accuracy."""

import json
import math

import torch

from distrain.metrics import MetricsLogger, confusion_matrix, per_class_accuracy, read_metrics


def test_jsonl_lines_and_torn_tail(tmp_path):
    m = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    m.log("train", epoch=0, step=3, loss=torch.tensor(1.5), samples=10)
    m.log("eval", epoch=0, step=3, loss=float("nan"), accuracy=0.5, samples=4)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"event": "trai')  # a crash mid-line
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["event"] for r in recs] == ["train", "eval"]
    assert recs[0]["loss"] == 1.5 and recs[1]["loss"] is None  # NaN is not valid JSON
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines()[:2]:
        json.loads(line)


def test_disabled_logger_writes_nothing(tmp_path):
    MetricsLogger(tmp_path, enabled=False).log("train", epoch=0)
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tb").exists()


def test_confusion_matrix_and_per_class():
    target = torch.tensor([0, 0, 1, 2, 2, 2])
    pred = torch.tensor([0, 1, 1, 2, 0, 2])
    cm = confusion_matrix(pred, target, 4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    acc = per_class_accuracy(cm)
    assert acc[0] == 0.5 and acc[1] == 1.0 and math.isclose(acc[2], 2 / 3) and acc[3] is None
