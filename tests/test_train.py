"""End to end on one CPU process: train on CIFAR-format files, then the run directory, eval and predict."""

import json

import pytest
import yaml

from conftest import load_weights, read_jsonl, run_distrain, smoke_args
from distrain.models import build_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_train_eval_predict_on_cifar_files(tmp_path, cifar_root):
    out = tmp_path / "run"
    args = ["train", *smoke_args(out, **{"data.name": "cifar10", "data.root": cifar_root, "data.verify": "false",
                                         "data.download": "false", "data.max_train_samples": "null",
                                         "data.max_test_samples": "null", "train.epochs": 2,
                                         "log.tensorboard": "true"})]
    p = run_distrain(args, check=True)
    assert p.stdout == ""  # human output goes to stderr

    # The run directory as the spec lists it.
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["data"]["name"] == "cifar10" and cfg["train"]["epochs"] == 2 and cfg["output_dir"] == str(out)
    metrics = read_jsonl(out / "metrics.jsonl")
    trains = [m for m in metrics if m["event"] == "train"]
    evals = [m for m in metrics if m["event"] == "eval"]
    assert [m["epoch"] for m in trains] == [0, 1] and all(m["samples"] == 500 for m in trains)
    assert [m["epoch"] for m in evals] == [0, 1] and all(m["samples"] == 100 for m in evals)
    for m in trains + evals:
        assert {"epoch", "step", "loss", "samples"} <= m.keys()
    assert all(0 <= m["accuracy"] <= 1 for m in evals)
    assert trains[-1]["step"] == 2 * 16  # 500 images / 32 per step, rounded up, per epoch
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "latest").is_file()

    # Export: a plain state_dict that loads strictly; model.json says how to use it.
    sd = load_weights(out / "model.safetensors")
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in sd)
    build_model("cifar10_quick", num_classes=10).load_state_dict(sd, strict=True)
    info = json.loads((out / "model.json").read_text())
    assert info["architecture"] == "cifar10_quick" and info["num_classes"] == 10
    assert info["classes"][:2] == ["airplane", "automobile"] and info["input_size"] == [3, 32, 32]
    assert len(info["mean"]) == 3 and len(info["std"]) == 3

    # eval from the run directory and from the exported file: exact count, same numbers as training's last eval.
    for path in (out, out / "model.safetensors"):
        r = run_distrain(["eval", "--checkpoint", str(path), "--json"], check=True)
        res = json.loads(r.stdout)
        assert res["samples"] == 100
        assert res["accuracy"] == pytest.approx(evals[-1]["accuracy"])
        assert res["loss"] == pytest.approx(evals[-1]["loss"], rel=1e-4)

    # predict on a PNG of any size and mode.
    from PIL import Image

    img = tmp_path / "x.png"
    Image.new("RGBA", (45, 70), (200, 10, 10, 128)).save(img)
    r = run_distrain(["predict", "--checkpoint", str(out), "--json", "--topk", "3", str(img)], check=True)
    preds = json.loads(r.stdout)["predictions"]
    assert len(preds) == 1 and preds[0]["path"] == str(img) and len(preds[0]["topk"]) == 3
    assert preds[0]["class"] in info["classes"]
    assert sum(t["probability"] for t in preds[0]["topk"]) <= 1.0 + 1e-6


def test_max_steps_stops_early_and_exports(tmp_path):
    out = tmp_path / "run"
    run_distrain(["train", *smoke_args(out, **{"train.max_steps": 3, "train.epochs": 5})], check=True)
    m = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in m if r["event"] == "train"] == [3]
    assert [r["step"] for r in m if r["event"] == "eval"] == [3]
    assert (out / "model.safetensors").is_file()


def test_defaults_train_well_on_synthetic(tmp_path):
    """The default recipe (only the data shrunk) learns: far above chance after 2 short epochs."""
    out = tmp_path / "run"
    run_distrain(["train", "-c", "configs/cifar10_quick.yaml", f"output_dir={out}", "data.name=synthetic",
                  "data.max_train_samples=2048", "data.max_test_samples=512", "train.epochs=2",
                  "train.warmup_steps=4", "log.tensorboard=false"], check=True)
    ev = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "eval"][-1]
    assert ev["accuracy"] > 0.5, ev


def test_refused_resume_leaves_the_run_untouched(tmp_path):
    out = tmp_path / "run"
    run_distrain(["train", *smoke_args(out, **{"train.max_steps": 2})], check=True)
    before = {p.name: p.read_bytes() for p in (out / "config.yaml", out / "model.safetensors", out / "model.json")}
    p = run_distrain(["train", *smoke_args(out, **{"model.num_classes": 5})])
    assert p.returncode == 2 and "10 classes" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert {n: (out / n).read_bytes() for n in before} == before
