"""CUDA paths: mixed precision, memory formats, compile, the device pipeline, fused optimizers, checkpoints
across devices, memory records, cuDNN settings, two ranks on one GPU.

Marked ``gpu`` and skipped without a CUDA GPU; benchmarks/gpu_check.sh runs them (``pytest -m gpu``) on a
lent GPU. Training runs are real subprocesses with the GPU visible (conftest hides it by default); the
in-process tests build what `distrain train` builds. CPU and GPU kernels round differently, so results
that cross devices are compared with a tolerance, never bit for bit (the input pipeline is the exception:
it is integer gathers and the same float operations on both).
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import load_weights, max_abs_diff, metrics_events, read_jsonl, run_distrain, smoke_args, subprocess_env

pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.timeout(300),
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs these on one)")]


def gpu_env(**extra) -> dict:
    """The subprocess environment with the first GPU visible (conftest hides GPUs by default)."""
    return subprocess_env(CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES") or "0", **extra)


def train_gpu(out, nprocs: int = 1, env: dict | None = None, **over):
    args = smoke_args(out, **{"train.device": "cuda", "log.progress": "none", **over})
    return run_distrain(["train", *args], nprocs=nprocs, env=env or gpu_env(), check=True)


def strict_export(run_dir, model: str = "cifar10_quick") -> dict:
    from distrain.models import build_model

    sd = load_weights(run_dir / "model.safetensors")
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in sd)
    assert all(v.dtype == torch.float32 for v in sd.values())
    build_model(model, num_classes=10).load_state_dict(sd, strict=True)
    return sd


@pytest.fixture
def fresh_accelerate():
    """In-process tests build an Accelerator each: Accelerate's process-wide state is reset after each."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_trains_and_exports_fp32(tmp_path, precision) -> None:
    out = tmp_path / "run"
    train_gpu(out, **{"train.mixed_precision": precision, "train.epochs": 2})
    start = metrics_events(out, "start")[0]
    assert start["device"] == "cuda" and start["precision"] == precision
    losses = [e["loss"] for e in metrics_events(out, "train")]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    strict_export(out)


def _trainer(tmp_path, *over: str):
    from distrain.bench import build_trainer
    from distrain.config import load_config

    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "data.name=synthetic", "data.max_train_samples=256",
                             "data.max_test_samples=32", "train.batch_size=32", "train.device=cuda", *over])
    return build_trainer(cfg)


def test_fp16_overflow_skips_the_step_and_the_schedule(tmp_path, fresh_accelerate) -> None:
    """A real overflow (loss scale 2^60): no weight change, no LR step, a smaller scale; then steps resume."""
    from distrain.bench import run_train_steps
    from distrain.distributed import unwrap

    t = _trainer(tmp_path, "train.mixed_precision=fp16", "train.scheduler=cosine", "train.epochs=4")
    acc, sched = t.strategy.accelerator, t.parts.scheduler
    scaler = acc.scaler
    assert scaler is not None and scaler.is_enabled()
    before = {k: v.clone() for k, v in unwrap(t.model).state_dict().items()}
    scaler.update(2.0 ** 60)
    run_train_steps(t, 1)
    assert acc.optimizer_step_was_skipped
    assert sched.last_epoch == 0, "a skipped step must not advance the LR schedule"
    assert scaler.get_scale() < 2.0 ** 60
    assert max_abs_diff(before, unwrap(t.model).state_dict()) == 0.0
    scaler.update(1024.0)
    run_train_steps(t, 2)
    assert not acc.optimizer_step_was_skipped
    assert sched.last_epoch == 2 and t.state.global_step == 3
    assert max_abs_diff(before, unwrap(t.model).state_dict()) > 0


def test_channels_last_and_compile_match_the_plain_model(tmp_path) -> None:
    """fp32, 4 steps: channels_last and torch.compile change kernels, not results (TF32-level tolerance)."""
    runs = {}
    for name, over in {"plain": {}, "channels_last": {"model.channels_last": "true"},
                       "compile": {"model.compile": "true", "model.channels_last": "true"}}.items():
        out = tmp_path / name
        train_gpu(out, **{"train.mixed_precision": "no", "train.max_steps": 4, "data.augment": "false", **over})
        runs[name] = strict_export(out)
    assert max_abs_diff(runs["plain"], runs["channels_last"]) < 5e-3
    assert max_abs_diff(runs["plain"], runs["compile"]) < 5e-3


@pytest.mark.parametrize("channels_last", [False, True])
def test_device_pipeline_on_cuda_is_bit_identical_to_the_cpu_paths(channels_last) -> None:
    from distrain.config import load_config
    from distrain.data.pipeline import InputPipeline, load_split
    from distrain.data.sampling import EpochPlan

    cfg = load_config(None, ["data.name=synthetic", "data.max_train_samples=200", "data.max_test_samples=70",
                             "data.augment=false", "train.batch_size=32", f"model.channels_last={channels_last}"])
    for train in (True, False):
        split = load_split(cfg, train=train)
        pipes = {}
        for device, loader in (("cuda", "device"), ("cpu", "device"), ("cpu", "dataloader")):
            cfg.data.loader = loader
            pipes[(device, loader)] = p = InputPipeline(split, cfg, torch.device(device), 0, 1, train=train)
            if train:
                p.set_epoch(EpochPlan(len(split), 32, 1, 0, 1, cfg.train.seed, 3))
        batches = {k: [tuple(t.cpu() for t in b) for b in p] for k, p in pipes.items()}
        ref = batches[("cuda", "device")]
        assert sum(len(b[1]) for b in ref) == len(split)
        for key, got in batches.items():
            assert len(got) == len(ref), key
            for (x, y, i), (rx, ry, ri) in zip(got, ref):
                assert torch.equal(i, ri) and torch.equal(y, ry), key
                assert x.dtype == rx.dtype and torch.equal(x, rx), f"{key} differs from the CUDA device path"


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_optimizers_on_cuda_match_unfused(name) -> None:
    from distrain.config import load_config
    from distrain.models import build_model
    from distrain.optim import build_optimizer

    cfg = load_config(None, [f"train.optimizer={name}", "train.lr=0.01"])
    torch.manual_seed(0)
    fused_model = build_model("cifar10_quick").cuda()
    ref_model = build_model("cifar10_quick").cuda()
    ref_model.load_state_dict(fused_model.state_dict())
    fused = build_optimizer(fused_model, cfg.train, cfg.model, "cuda")
    assert all(g["fused"] for g in fused.param_groups)
    ref = build_optimizer(ref_model, cfg.train, cfg.model, "cpu")  # the same groups and hyper-parameters
    for g in ref.param_groups:
        g["fused"], g["foreach"] = False, False
    x, y = torch.randn(16, 3, 32, 32, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    for model, opt in ((fused_model, fused), (ref_model, ref)):
        for _ in range(3):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    assert max_abs_diff(fused_model.state_dict(), ref_model.state_dict()) < 1e-5


def test_checkpoint_moves_gpu_to_cpu_and_back(tmp_path) -> None:
    """Written on the GPU, resumed on the CPU, resumed on the GPU again: the epoch's images once each."""
    out = tmp_path / "run"
    common = {"train.mixed_precision": "no", "data.augment": "false", "train.scheduler": "none"}
    train_gpu(out, **common, **{"train.max_steps": 2})
    cpu = run_distrain(["train", *smoke_args(out, **common, **{"train.device": "cpu", "train.max_steps": 4})],
                       check=True)  # conftest's environment: no GPU visible at all
    assert "resumed from" in cpu.stderr and "step00000002" in cpu.stderr
    back = train_gpu(out, **common, **{"train.max_steps": 6})
    assert "resumed from" in back.stderr and "step00000004" in back.stderr
    last = metrics_events(out, "train")[-1]
    assert last["step"] == 6 and last["samples"] == 6 * 32  # every image of the 6 steps counted once
    straight = tmp_path / "straight"
    train_gpu(straight, **common, **{"train.max_steps": 6})
    assert max_abs_diff(strict_export(out), strict_export(straight)) < 1e-3  # CPU steps round differently


def test_peak_memory_is_recorded_in_every_train_event(tmp_path) -> None:
    out = tmp_path / "run"
    train_gpu(out, **{"train.epochs": 2, "train.mixed_precision": "bf16"})
    events = metrics_events(out, "train")
    assert len(events) == 2
    for e in events:
        assert 0 < e["peak_mem_gib"] < torch.cuda.get_device_properties(0).total_memory / 2**30
        assert e["peak_mem_gib_per_device"] == [e["peak_mem_gib"]]


def test_cudnn_settings_and_run_to_run_reproducibility(tmp_path, fresh_accelerate) -> None:
    """cuDNN autotuning is on for CUDA runs (fixed shapes); two identical runs still agree closely."""
    _trainer(tmp_path, "train.mixed_precision=no")
    assert torch.backends.cudnn.enabled and torch.backends.cudnn.benchmark
    assert not torch.backends.cudnn.deterministic
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        train_gpu(out, **{"train.mixed_precision": "no", "train.max_steps": 4})
    diff = max_abs_diff(strict_export(a), strict_export(b))
    assert diff < 1e-4, f"two identical CUDA runs differ by {diff}"


def test_two_ranks_share_one_gpu_over_gloo(tmp_path) -> None:
    """2 processes on GPU 0 (gloo: NCCL will not put two ranks on one GPU) == 1 process, same global batch."""
    common = {"train.mixed_precision": "no", "data.augment": "false", "train.max_steps": 4,
              "data.max_test_samples": 67}
    one, two = tmp_path / "one", tmp_path / "two"
    train_gpu(one, **common, **{"train.batch_size": 32})
    train_gpu(two, nprocs=2, env=gpu_env(ACCELERATE_TORCH_DEVICE="cuda:0", DISTRAIN_DIST_BACKEND="gloo"),
              **common, **{"train.batch_size": 16})
    assert metrics_events(two, "start")[0]["world_size"] == 2
    assert [e["samples"] for e in metrics_events(two, "eval")] == [67]
    assert max_abs_diff(strict_export(one), strict_export(two)) < 1e-4
    assert read_jsonl(two / "metrics.jsonl")[-1]["event"] == "end"


def _fsdp_gpu(out, **over):
    """One process under launch/fsdp.yaml on the GPU (FSDP2 with a world of one)."""
    import subprocess
    import sys

    from conftest import REPO, free_port

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "launch" / "fsdp.yaml"), "--num_processes", "1", "--main_process_port",
           str(free_port()), "-m", "distrain", "train",
           *smoke_args(out, **{"train.device": "cuda", "log.progress": "none", **over})]
    p = subprocess.run(cmd, cwd=REPO, env=gpu_env(), capture_output=True, text=True, timeout=280)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def test_fsdp_on_one_gpu_matches_plain_training_and_resumes_exactly(tmp_path) -> None:
    common = {"train.mixed_precision": "no", "data.augment": "false", "train.scheduler": "none"}
    plain, sharded = tmp_path / "plain", tmp_path / "fsdp"
    train_gpu(plain, **common, **{"train.max_steps": 6})
    _fsdp_gpu(sharded, **common, **{"train.max_steps": 3})
    p = _fsdp_gpu(sharded, **common, **{"train.max_steps": 6})
    assert "resumed from" in p.stderr
    assert max_abs_diff(strict_export(plain), strict_export(sharded)) < 1e-4


def test_fsdp_bf16_with_compile_on_one_gpu_trains_and_exports(tmp_path) -> None:
    out = tmp_path / "run"
    _fsdp_gpu(out, **{"train.mixed_precision": "bf16", "model.compile": "true", "train.epochs": 2})
    events = metrics_events(out, "train")
    assert len(events) == 2 and events[-1]["loss"] < events[0]["loss"] + 1.0
    assert events[-1]["peak_mem_gib"] > 0
    strict_export(out)
