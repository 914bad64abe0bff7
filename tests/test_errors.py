"""Errors people understand: every user error exits 2 with one message that names the culprit and says
what to do, no traceback, on every rank, and nothing hangs. Also: `--help` of every command.

Under `accelerate launch` each worker exits 2 with its own `[rank N]` message; the launcher (torchrun's
elastic agent) then exits 1 and prints its own ChildFailedError report, whose `exitcode : 2` lines name
the workers' code. `LAUNCHER_EXIT` pins what accelerate 1.15 / torch 2.14 return, so the README stays true.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_distrain, smoke_args, traceback_of_ours
from distrain import cli

LAUNCHER_EXIT = 1  # `accelerate launch` when its workers exit 2 (documented in the README)


def assert_user_error(proc, command: str, *culprits: str) -> str:
    """Exit 2, stdout empty, the last stderr line is `distrain COMMAND: error: ...` naming every culprit."""
    err = proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\n{err[-3000:]}"
    assert proc.stdout == ""
    assert "Traceback" not in err, err[-3000:]
    lines = [l for l in err.splitlines() if l.startswith(f"distrain {command}: error: ")]
    assert len(lines) == 1, err[-3000:]
    assert err.rstrip("\n").splitlines()[-1] == lines[0]  # the last thing said
    for c in culprits:
        assert c in lines[0], f"{c!r} not in {lines[0]!r}"
    return lines[0]


def assert_user_error_on_every_rank(proc, command: str, *culprits: str, world: int = 2) -> None:
    err = proc.stderr
    assert proc.returncode == LAUNCHER_EXIT, f"exit {proc.returncode}\n{err[-3000:]}"
    assert proc.stdout == ""
    for r in range(world):
        lines = [l for l in err.splitlines() if l.startswith(f"[rank {r}] distrain {command}: error: ")]
        assert len(lines) == 1, f"rank {r}:\n{err[-4000:]}"  # once per rank, prefixed with the rank
        for c in culprits:
            assert c in lines[0], f"{c!r} not in {lines[0]!r}"
    # No traceback of ours (the launcher prints its own report); every worker exited 2.
    assert not traceback_of_ours(err), err[-4000:]
    assert len(re.findall(r"^\s*exitcode\s*:\s*2\b", err, re.M)) == world, err[-4000:]


def in_process(capsys, *argv: str) -> str:
    """`distrain ARGV` in this process (only for errors raised before any process group); returns the message."""
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", (rc, out, err)
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"distrain {argv[0]}: error: ")
    return err.strip()


# -- config ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, needles", [
    ("train.bach_size=3", ["unknown config key 'train.bach_size'", "did you mean 'train.batch_size'"]),
    ("modle.name=vgg16", ["unknown config key 'modle.name'", "did you mean 'model.name'"]),
    ("train.lr=-0.1", ["'train.lr'", "> 0", "-0.1"]),
    ("train.batch_size=0", ["'train.batch_size'", ">= 1", "0"]),
    ("train.epochs=many", ["'train.epochs'", "an integer", "many"]),
    # resnet50 is a model now (any torchvision classifier): an unknown name gets the nearest ones.
    ("model.name=resnet19", ["'model.name'", "unknown model 'resnet19'", "did you mean", "resnet18"]),
    ("train.mixed_precision=fp8", ["'train.mixed_precision'", "'bf16'", "fp8"]),
    ("data.name=mnist", ["'data.name'", "'cifar10'", "mnist"]),
    ("train=3", ["'train' is a section"]),
    ("train.lr", ["'train.lr' is not KEY=VALUE", "train.lr=0.1"]),
    ("=3", ["has no key"]),
])
def test_config_errors_name_the_key(capsys, override: str, needles: list[str]) -> None:
    msg = in_process(capsys, "train", override)
    for n in needles:
        assert n in msg, (n, msg)


def test_config_file_errors(tmp_path, capsys) -> None:
    missing = tmp_path / "nope.yaml"
    assert f"config file '{missing}' does not exist" in in_process(capsys, "train", "-c", str(missing))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [0.1\n  epochs: 2\n")
    msg = in_process(capsys, "train", "-c", str(bad))
    assert f"'{bad}' is not valid YAML" in msg
    lst = tmp_path / "list.yaml"
    lst.write_text("- train.lr=0.1\n- train.epochs=2\n")
    msg = in_process(capsys, "train", "-c", str(lst))
    assert f"'{lst}'" in msg and "mapping" in msg and "list" in msg
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"train": {"epoch": 3}}))
    assert "did you mean 'train.epochs'" in in_process(capsys, "train", "-c", str(typo))
    d = tmp_path / "a_dir"
    d.mkdir()
    assert f"'{d}'" in in_process(capsys, "train", "-c", str(d))


def test_eval_and_bench_overrides_are_checked_too(capsys, tmp_path) -> None:
    assert "did you mean 'train.batch_size'" in in_process(capsys, "bench", "train.bach_size=3")
    assert f"checkpoint '{tmp_path / 'none'}' does not exist" in in_process(capsys, "eval", "--checkpoint", str(tmp_path / "none"))


@pytest.mark.slow
def test_config_error_in_a_subprocess(tmp_path) -> None:
    proc = run_distrain(["train", f"output_dir={tmp_path / 'run'}", "train.lr=-1"])
    assert_user_error(proc, "train", "train.lr")
    assert not (tmp_path / "run").exists()  # a bad config leaves nothing behind


# -- devices and precision --------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_and_fp16_without_a_gpu(tmp_path) -> None:
    proc = run_distrain(["train", *smoke_args(tmp_path / "a", **{"train.device": "cuda"})])
    assert_user_error(proc, "train", "train.device=cuda", "no CUDA GPU", "train.device=auto")
    proc = run_distrain(["train", *smoke_args(tmp_path / "b", **{"train.mixed_precision": "fp16"})])
    assert_user_error(proc, "train", "train.mixed_precision=fp16", "needs a CUDA GPU", "bf16")


# -- data --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory) -> Path:
    from fakes import write_fake_cifar10

    root = tmp_path_factory.mktemp("errcifar")
    write_fake_cifar10(root, n_train=100, n_test=20)
    return root


def _cifar_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst / "cifar-10-batches-py"


def _cifar_args(out: Path, root: Path, **over) -> list[str]:
    return smoke_args(out, **{"data.name": "cifar10", "data.root": root, "data.download": "false",
                              "data.max_train_samples": "null", "data.max_test_samples": "null", **over})


@pytest.mark.slow
def test_missing_data_with_download_off(tmp_path) -> None:
    proc = run_distrain(["train", *_cifar_args(tmp_path / "run", tmp_path / "nodata")])
    assert_user_error(proc, "train", str(tmp_path / "nodata" / "cifar-10-batches-py"), "data.download=true")


@pytest.mark.slow
def test_missing_file_truncated_and_corrupt_files_are_named(tmp_path, fake_cifar) -> None:
    folder = _cifar_copy(fake_cifar, tmp_path / "missing")
    (folder / "data_batch_3").unlink()
    proc = run_distrain(["train", *_cifar_args(tmp_path / "r1", tmp_path / "missing", **{"data.verify": "false"})])
    assert_user_error(proc, "train", str(folder / "data_batch_3"), "missing")

    folder = _cifar_copy(fake_cifar, tmp_path / "trunc")
    f = folder / "data_batch_1"
    f.write_bytes(f.read_bytes()[:5000])
    proc = run_distrain(["train", *_cifar_args(tmp_path / "r2", tmp_path / "trunc", **{"data.verify": "false"})])
    assert_user_error(proc, "train", str(f), "not a valid CIFAR-10 python batch", "download or extract it again")

    folder = _cifar_copy(fake_cifar, tmp_path / "garbage")
    f = folder / "test_batch"
    f.write_bytes(b"\x00garbage" * 1000)
    proc = run_distrain(["train", *_cifar_args(tmp_path / "r3", tmp_path / "garbage", **{"data.verify": "false"})])
    assert_user_error(proc, "train", str(f))


@pytest.mark.slow
def test_md5_mismatch_is_named_with_the_way_out(tmp_path, fake_cifar) -> None:
    # The fakes are in the official format, not the official files: verification must refuse them.
    proc = run_distrain(["train", *_cifar_args(tmp_path / "run", fake_cifar, **{"data.verify": "true"})])
    assert_user_error(proc, "train", "cifar-10-batches-py", "MD5", "expected the official", "data.verify=false")


# -- output ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_output_dir_that_cannot_be_created(tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("I am a file")
    proc = run_distrain(["train", *smoke_args(blocker / "run")])
    assert_user_error(proc, "train", "output_dir", str(blocker / "run"))


@pytest.mark.slow
def test_eval_confusion_dir_that_cannot_be_created(tmp_path, trained) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = run_distrain(["eval", "--checkpoint", str(trained), "--confusion", str(blocker / "cm")])
    assert_user_error(proc, "eval", "--confusion", str(blocker / "cm"))


# -- checkpoints -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("errrun") / "run"
    run_distrain(["train", *smoke_args(out, **{"data.max_train_samples": 64})], check=True)
    return out


@pytest.mark.slow
def test_missing_and_incompatible_checkpoints(tmp_path, trained) -> None:
    proc = run_distrain(["train", *smoke_args(tmp_path / "r1", resume=tmp_path / "nope")])
    assert_user_error(proc, "train", "resume", str(tmp_path / "nope"))

    proc = run_distrain(["train", *smoke_args(tmp_path / "r2", resume=trained, **{"model.num_classes": 5})])
    assert_user_error(proc, "train", str(trained / "checkpoints"), "10 classes", "5", "resume=none")

    proc = run_distrain(["train", *smoke_args(tmp_path / "r3", resume=trained, **{"train.batch_size": 16,
                                                                                  "data.max_train_samples": 64})])
    assert_user_error(proc, "train", "global batch 32", "16", "train.allow_batch_change=true")

    # A damaged checkpoint named explicitly is refused, naming the file.
    ckpt_dir = trained.parent / "damaged"
    latest = (trained / "checkpoints" / "latest").read_text().strip()
    shutil.copytree(trained / "checkpoints" / latest, ckpt_dir)
    f = ckpt_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    proc = run_distrain(["train", *smoke_args(tmp_path / "r4", resume=ckpt_dir)])
    assert_user_error(proc, "train", str(f), "truncated")


@pytest.mark.slow
def test_eval_checkpoint_errors(tmp_path, trained) -> None:
    proc = run_distrain(["eval", "--checkpoint", str(tmp_path / "nope"), "--json"])
    assert_user_error(proc, "eval", str(tmp_path / "nope"), "does not exist")

    (tmp_path / "empty").mkdir()
    proc = run_distrain(["eval", "--checkpoint", str(tmp_path / "empty")])
    assert_user_error(proc, "eval", str(tmp_path / "empty"), "neither model.safetensors nor a distrain checkpoint")

    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(trained / "model.safetensors", copy / "model.safetensors")
    info = json.loads((trained / "model.json").read_text())
    (copy / "model.json").write_text(json.dumps({**info, "architecture": "vgg16"}))
    proc = run_distrain(["eval", "--checkpoint", str(copy / "model.safetensors"), "--json"])
    assert_user_error(proc, "eval", str(copy / "model.safetensors"), "does not fit a vgg16")

    (copy / "model.json").unlink()
    proc = run_distrain(["eval", "--checkpoint", str(copy / "model.safetensors")])
    assert_user_error(proc, "eval", str(copy / "model.json"), "is missing")


@pytest.mark.slow
def test_eval_with_a_checkpoint_directory_and_confusion_report(tmp_path, trained) -> None:
    """Not an error: the checkpoint-directory form works, and --confusion writes the report."""
    latest = (trained / "checkpoints" / "latest").read_text().strip()
    proc = run_distrain(["eval", "--checkpoint", str(trained / "checkpoints" / latest), "--json",
                         "--confusion", str(tmp_path / "report" / "deep")], check=True)
    res = json.loads(proc.stdout)
    d = tmp_path / "report" / "deep"
    for name in ("confusion_matrix.txt", "confusion_matrix.png", "confusion_matrix.csv", "per_class_accuracy.json"):
        assert (d / name).is_file(), name
    per = json.loads((d / "per_class_accuracy.json").read_text())
    assert per["samples"] == res["samples"] == 64 and per["accuracy"] == pytest.approx(res["accuracy"])
    assert per["per_class_accuracy"] == pytest.approx(res["per_class_accuracy"])
    assert sum(map(sum, per["confusion_matrix"])) == 64
    table = (d / "confusion_matrix.txt").read_text()
    assert "rows: true class, columns: predicted class" in table and "airplane" in table
    from PIL import Image

    with Image.open(d / "confusion_matrix.png") as im:
        assert im.format == "PNG" and min(im.size) > 200


# -- every rank --------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_processes_fail_the_same_way_and_none_hangs(tmp_path, trained, fake_cifar) -> None:
    # Before any process group: the config.
    proc = run_distrain(["train", f"output_dir={tmp_path / 'r0'}", "train.lr=-1"], nprocs=2, timeout=120)
    assert_user_error_on_every_rank(proc, "train", "train.lr")
    # Found by rank 0 alone (run directory, data preparation), agreed by all.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_distrain(["train", *smoke_args(blocker / "run")], nprocs=2, timeout=120)
    assert_user_error_on_every_rank(proc, "train", "output_dir", str(blocker / "run"))
    proc = run_distrain(["train", *_cifar_args(tmp_path / "r2", tmp_path / "nodata")], nprocs=2, timeout=120)
    assert_user_error_on_every_rank(proc, "train", "data.download=true")
    # Found by every rank (MD5), and a resume that does not fit.
    proc = run_distrain(["train", *_cifar_args(tmp_path / "r3", fake_cifar)], nprocs=2, timeout=120)
    assert_user_error_on_every_rank(proc, "train", "MD5", "data.verify=false")
    proc = run_distrain(["train", *smoke_args(tmp_path / "r4", resume=trained, **{"model.num_classes": 5})],
                        nprocs=2, timeout=120)
    assert_user_error_on_every_rank(proc, "train", "10 classes")
    # eval: a missing checkpoint, a report directory that cannot be made.
    proc = run_distrain(["eval", "--checkpoint", str(tmp_path / "nope")], nprocs=2, timeout=120)
    assert_user_error_on_every_rank(proc, "eval", str(tmp_path / "nope"))
    proc = run_distrain(["eval", "--checkpoint", str(trained), "--confusion", str(blocker / "cm")], nprocs=2, timeout=120)
    assert_user_error_on_every_rank(proc, "eval", "--confusion")


# -- help ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command, options", [
    (None, ["train", "eval", "predict", "bench", "--version"]),
    ("train", ["-c", "--config", "KEY=VALUE", "train.lr", "train.batch_size", "data.name", "model.name",
               "train.mixed_precision", "log.progress", "log.tensorboard", "resume", "output_dir"]),
    ("eval", ["--checkpoint", "--json", "--confusion", "KEY=VALUE"]),
    ("predict", ["--checkpoint", "--json", "--topk", "--batch-size", "IMAGE"]),
    ("bench", ["-c", "--json", "--steps", "--warmup", "KEY=VALUE", "train.batch_size"]),
])
def test_help_lists_every_option(capsys, command, options) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(([command] if command else []) + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for o in options:
        assert o in out, (command, o)


def test_usage_errors_exit_2(capsys) -> None:
    for argv in ([], ["frobnicate"], ["eval"], ["predict", "--checkpoint", "x"], ["predict", "--topk", "x", "--checkpoint", "c", "i"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2, argv
        err = capsys.readouterr().err
        assert "usage: distrain" in err and "error:" in err and "Traceback" not in err


@pytest.mark.slow
def test_help_in_a_subprocess() -> None:
    for command in ("train", "eval", "predict", "bench"):
        proc = run_distrain([command, "--help"])
        assert proc.returncode == 0 and proc.stdout.startswith(f"usage: distrain {command}"), proc.stderr


def test_bf16_on_a_gpu_without_it_and_auto_precision(monkeypatch) -> None:
    """What the engine decides before any process starts (a fake GPU: the decision logic only)."""
    from distrain.distributed import resolve_runtime
    from distrain.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Old GPU")
    with pytest.raises(UserError, match=r"train.mixed_precision=bf16.*Old GPU.*fp16 or auto"):
        resolve_runtime("auto", "bf16")
    rt = resolve_runtime("auto", "auto")
    assert (rt.device, rt.precision) == ("cuda", "fp16") and "Old GPU" in rt.note
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_runtime("auto", "bf16").precision == "bf16"  # CPU autocast, as asked
    assert resolve_runtime("cpu", "auto").precision == "no"
    with pytest.raises(UserError, match="train.device=cuda"):
        resolve_runtime("cuda", "no")
