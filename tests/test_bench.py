"""`distrain bench`: one JSON object on stdout, positive throughputs, nothing written; FLOPs and peaks.

No timing assertions: the test machines are shared and noisy.
"""

from __future__ import annotations

import json
import os

import pytest

from conftest import run_distrain

TINY = ["data.name=synthetic", "data.max_train_samples=96", "data.max_test_samples=16", "train.batch_size=16"]


def _listing(root) -> set:
    return {os.path.relpath(os.path.join(d, f), root) for d, dirs, files in os.walk(root) for f in files + dirs}


@pytest.mark.slow
def test_bench_json_is_one_object_and_writes_nothing(tmp_path) -> None:
    out = tmp_path / "run"
    before = _listing(tmp_path)
    proc = run_distrain(["bench", "--json", "--steps", "3", "--warmup", "1", f"output_dir={out}", *TINY,
                         "train.grad_accum_steps=2"], cwd=tmp_path, check=True)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    r = json.loads(lines[0])
    assert isinstance(r, dict)
    assert r["data_img_per_s"] > 0 and r["train_img_per_s"] > 0
    assert r["world_size"] == 1 and r["global_batch"] == 32 and r["steps"] == 3 and r["device"] == "cpu"
    windows = r["train_windows_img_per_s"]  # --repeats 3 by default: the rate is their median
    assert r["repeats"] == 3 and len(windows) == 3
    assert round(r["train_img_per_s"], 1) == sorted(windows)[1]
    assert r["timed"].startswith("3 window(s) of 3 optimizer steps, 2-10 (epochs 1-4), median"), r["timed"]
    assert r["model"] == "cifar10_quick" and r["loader"] == "device" and r["augment"] is True
    assert r["fwd_flops_per_image"] == 24_708_352  # analytic count of the seed's CIFAR10-quick net
    assert r["mfu"] is None  # no GPU peak on a CPU
    assert not out.exists()
    assert _listing(tmp_path) == before  # nothing in the cwd either (no runs/, no data cache, no tb)


@pytest.mark.slow
def test_bench_human_output_goes_to_stderr(tmp_path) -> None:
    proc = run_distrain(["bench", "--steps", "2", "--warmup", "0", f"output_dir={tmp_path / 'run'}", *TINY,
                         "data.loader=dataloader", "data.augment=false"], cwd=tmp_path, check=True)
    assert proc.stdout == ""
    assert "input pipeline" in proc.stderr and "training step" in proc.stderr and "img/s" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("args,words", [
    (["train.bach_size=4"], "train.batch_size"),
    (["--steps", "0"], "--steps"),
    (["train.lr=-1"], "train.lr"),
])
def test_bench_user_errors_exit_2(tmp_path, args, words) -> None:
    proc = run_distrain(["bench", "--json", f"output_dir={tmp_path / 'run'}", *TINY, *args], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert words in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_bench_under_accelerate_launch_reports_global_numbers_once(tmp_path) -> None:
    proc = run_distrain(["bench", "--json", "--steps", "2", "--warmup", "1", f"output_dir={tmp_path / 'run'}", *TINY],
                        nprocs=2, cwd=tmp_path, check=True)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout  # the main process only
    r = json.loads(lines[0])
    assert r["world_size"] == 2 and r["global_batch"] == 32
    assert r["data_img_per_s"] > 0 and r["train_img_per_s"] > 0
    assert not (tmp_path / "run").exists()


def test_peak_table_by_device_name(monkeypatch) -> None:
    from distrain.bench import peak_bf16_tflops

    monkeypatch.delenv("DISTRAIN_PEAK_TFLOPS", raising=False)
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("NVIDIA H200") == 989.0
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_bf16_tflops("NVIDIA GeForce GTX 1080") is None
    monkeypatch.setenv("DISTRAIN_PEAK_TFLOPS", "100")
    assert peak_bf16_tflops("anything") == 100.0


def test_forward_flops_are_counted_without_compute() -> None:
    from distrain.bench import forward_flops_per_image
    from distrain.config import load_config

    quick = forward_flops_per_image(load_config(None, []))
    # conv 3->32 at 32x32, 32->32 at 16x16, 32->64 at 8x8 (5x5 kernels), fc 1024->64->10; 2 FLOPs per MAC.
    macs = 32 * 32 * 32 * 3 * 25 + 16 * 16 * 32 * 32 * 25 + 8 * 8 * 64 * 32 * 25 + 1024 * 64 + 64 * 10
    assert quick == 2 * macs
    vgg = forward_flops_per_image(load_config(None, ["model.name=vgg16", "model.input_size=224"]))
    assert 30e9 < vgg < 32e9  # VGG16 at 224x224: ~15.5 GMACs
