"""VGG16 fine-tuning: ImageNet weights (hub cache, local file, offline), freezing and unfreezing, channels_last, compile.

Stand-in weight files (random, torchvision's format) come from fakes.write_vgg16_weights; nothing is downloaded.
VGG16 is slow on a CPU, so process tests use 32x32 inputs, a few dozen images and two or three steps.
"""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from conftest import load_weights, read_jsonl, run_distrain, smoke_args, subprocess_env
from distrain.config import ModelConfig, TrainConfig
from distrain.errors import UserError
from distrain.models import build_model
from distrain.optim import build_optimizer
from distrain.weights import hub_path, load_pretrained, prepare_weights
from fakes import VGG16_BN_HUB_FILENAME, VGG16_HUB_FILENAME, write_image_folder, write_vgg16_weights

HEAD = "classifier.6."


def _file_sd(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _fresh(name: str = "vgg16", num_classes: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(name, num_classes=num_classes)


def _offline(monkeypatch) -> None:
    def no_network(url, dst, *a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


class _Cfg:  # just what prepare_weights reads
    def __init__(self, **model):
        self.model = ModelConfig(**model)


# -- loading -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory) -> Path:
    return write_vgg16_weights(tmp_path_factory.mktemp("w") / "vgg16.pth", seed=1)


@pytest.fixture(scope="module")
def vgg_bn_file(tmp_path_factory) -> Path:
    return write_vgg16_weights(tmp_path_factory.mktemp("w") / "vgg16_bn.pth", seed=3, bn=True)


def test_weights_path_loads_everything_but_the_head(vgg_file) -> None:
    model = _fresh()
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(HEAD)}
    load_pretrained(model, ModelConfig(name="vgg16", weights_path=str(vgg_file)))
    sd, ref = model.state_dict(), _file_sd(vgg_file)
    assert torch.equal(sd["features.0.weight"], ref["features.0.weight"])  # really from the file
    for k, v in sd.items():
        if k.startswith(HEAD):
            assert torch.equal(v, head_before[k])  # the fresh num_classes head stays
        else:
            assert torch.equal(v, ref[k]), k
    assert sd[HEAD + "weight"].shape == (10, 4096) and ref[HEAD + "weight"].shape == (1000, 4096)


def test_pretrained_reads_the_hub_cache(tmp_path, monkeypatch, vgg_file, vgg_bn_file) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    _offline(monkeypatch)  # the file is there: nothing may be fetched
    expected = tmp_path / "th" / "hub" / "checkpoints" / VGG16_HUB_FILENAME
    assert hub_path("vgg16") == expected
    expected.parent.mkdir(parents=True)
    expected.symlink_to(vgg_file)
    prepare_weights(_Cfg(name="vgg16", pretrained=True))
    model = _fresh()
    load_pretrained(model, ModelConfig(name="vgg16", pretrained=True))
    assert torch.equal(model.state_dict()["features.28.weight"], _file_sd(vgg_file)["features.28.weight"])

    # vgg16_bn has its own file (and BatchNorm buffers, loaded too).
    bn = expected.parent / VGG16_BN_HUB_FILENAME
    assert hub_path("vgg16_bn") == bn
    bn.symlink_to(vgg_bn_file)
    model = _fresh("vgg16_bn", num_classes=5)
    load_pretrained(model, ModelConfig(name="vgg16_bn", num_classes=5, pretrained=True))
    assert torch.equal(model.state_dict()["features.1.running_var"], _file_sd(vgg_bn_file)["features.1.running_var"])


def test_online_download_goes_to_the_hub_cache_with_its_hash(tmp_path, monkeypatch, vgg_file) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix))
        Path(dst).symlink_to(vgg_file)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    prepare_weights(_Cfg(name="vgg16", pretrained=True))
    assert calls == [(torchvision.models.VGG16_Weights.IMAGENET1K_V1.url, str(hub_path("vgg16")), "397923af")]
    prepare_weights(_Cfg(name="vgg16", pretrained=True))  # cached now: no second download
    assert len(calls) == 1


def test_offline_and_missing_names_the_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    _offline(monkeypatch)
    expected = tmp_path / "th" / "hub" / "checkpoints" / VGG16_HUB_FILENAME
    with pytest.raises(UserError) as e:
        prepare_weights(_Cfg(name="vgg16", pretrained=True))
    assert str(expected) in str(e.value) and torchvision.models.VGG16_Weights.IMAGENET1K_V1.url in str(e.value)
    with pytest.raises(UserError) as e:  # a rank that finds no file says the same
        load_pretrained(torch.nn.Module(), ModelConfig(name="vgg16", pretrained=True))
    assert str(expected) in str(e.value)


class NotATensor:
    pass


def test_bad_weight_files_are_user_errors(tmp_path, vgg_file, vgg_bn_file) -> None:
    body = {k: v for k, v in _file_sd(vgg_file).items() if not k.startswith(HEAD)}  # a headless file is fine
    wrong_shape = dict(body, **{"features.0.weight": torch.zeros(64, 3, 5, 5)})
    missing_key = {k: v for k, v in body.items() if k != "features.28.bias"}
    files = {"bn_into_plain": vgg_bn_file}
    for name, obj in (("wrong_shape", wrong_shape), ("missing_key", missing_key),
                      ("pickled_object", {"features.0.weight": NotATensor()})):  # weights_only refuses: no code runs
        files[name] = tmp_path / f"{name}.pth"
        torch.save(obj, files[name])
    files["garbage"] = tmp_path / "garbage.pth"
    files["garbage"].write_bytes(b"\x00definitely not a torch file" * 10)
    files["absent"] = tmp_path / "absent.pth"
    expect = {"bn_into_plain": "vgg16_bn?", "wrong_shape": "features.0.weight (64, 3, 5, 5)",
              "missing_key": "features.28.bias", "pickled_object": "cannot read", "garbage": "cannot read",
              "absent": "does not exist"}
    model = _fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for case, f in files.items():
        with pytest.raises(UserError) as e:
            load_pretrained(model, ModelConfig(name="vgg16", weights_path=str(f)))
        msg = str(e.value)
        assert "model.weights_path" in msg and str(f) in msg and expect[case] in msg, (case, msg)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded
    model.load_state_dict(dict(body, **{k: v for k, v in before.items() if k.startswith(HEAD)}))  # body itself fits


def test_safetensors_file_with_another_head_is_accepted(tmp_path, vgg_file) -> None:
    from safetensors.torch import save_file

    sd = _file_sd(vgg_file)
    sd[HEAD + "weight"], sd[HEAD + "bias"] = torch.zeros(3, 4096), torch.zeros(3)  # e.g. a distrain export
    f = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(f))
    model = _fresh(num_classes=10)
    load_pretrained(model, ModelConfig(name="vgg16", num_classes=10, weights_path=str(f)))
    assert torch.equal(model.state_dict()["features.0.weight"], sd["features.0.weight"])
    assert model.state_dict()[HEAD + "weight"].shape == (10, 4096)


# -- optimizer and freezing ----------------------------------------------------------------------

def test_frozen_backbone_gets_no_state_and_stays_bit_identical() -> None:
    tcfg = TrainConfig(lr=0.1, weight_decay=5e-4)
    model = _fresh("vgg16_bn", num_classes=4)
    for p in model.features.parameters():
        p.requires_grad_(False)
    feats = list(model.features.parameters())
    for unfreeze in (None, 1):
        mcfg = ModelConfig(name="vgg16_bn", num_classes=4, freeze_features=True, unfreeze_after_epochs=unfreeze)
        opt = build_optimizer(model, tcfg, mcfg)
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        # Without a planned unfreeze the backbone is not in the optimizer; with one it is, without state.
        assert all((id(p) in in_opt) == (unfreeze is not None) for p in feats)
        before = {k: v.clone() for k, v in model.features.state_dict().items()}
        model.train()
        model.features.eval()  # what the engine does to a frozen backbone's BatchNorm
        for _ in range(2):
            model(torch.randn(2, 3, 32, 32)).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert all(p.grad is None and not opt.state.get(p) for p in feats)
        for k, v in model.features.state_dict().items():
            assert torch.equal(v, before[k]), k
        assert any(opt.state.get(p) for p in model.classifier.parameters())


@pytest.mark.parametrize("size", [64, 224])
def test_input_size_upsamples_on_the_device_and_vgg_accepts_it(size) -> None:
    from distrain.config import Config
    from distrain.data.pipeline import InputPipeline
    from distrain.build import pipeline_spec, split_of

    cfg = Config()
    cfg.data.name, cfg.data.max_test_samples = "synthetic", 2
    cfg.model.name, cfg.model.input_size, cfg.model.pretrained, cfg.model.channels_last = "vgg16", size, True, True
    split = split_of(cfg, train=False)
    x, y, idx = next(iter(InputPipeline(split, pipeline_spec(cfg, cfg.train.batch_size), "cpu", 0, 1, train=False)))
    assert x.shape == (2, 3, size, size) and x.is_contiguous(memory_format=torch.channels_last)
    assert abs(float(x.mean())) < 3  # ImageNet-normalised
    model = _fresh().to(memory_format=torch.channels_last).eval()
    with torch.no_grad():
        assert model(x).shape == (2, 10)


# -- end to end ----------------------------------------------------------------------------------



def _vgg_args(out: Path, **over) -> list[str]:
    base = {"model.name": "vgg16", "model.input_size": 32, "data.max_train_samples": 32, "data.max_test_samples": 16,
            "train.batch_size": 16, "train.max_steps": 2, "log.every_steps": 1, "log.progress": "none"}
    base.update(over)
    return smoke_args(out, **base)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_pretrained_frozen_finetune_on_own_images(tmp_path) -> None:
    """ImageNet stand-in in TORCH_HOME, frozen features, channels_last, an image folder; export fits torchvision."""
    hub_file = write_vgg16_weights(tmp_path / "th" / "hub" / "checkpoints" / VGG16_HUB_FILENAME, seed=5)
    root = write_image_folder(tmp_path / "photos", classes=("ants", "bees", "wasps"), per_class_train=6,
                              per_class_val=3)
    out = tmp_path / "run"
    env = subprocess_env(TORCH_HOME=tmp_path / "th", https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9")
    args = ["train", *_vgg_args(out, **{"data.name": "imagefolder", "data.root": root, "model.num_classes": 3,
                                         "model.pretrained": "true", "model.freeze_features": "true",
                                         "model.channels_last": "true", "train.batch_size": 8})]
    run_distrain(args, env=env, check=True, timeout=200)

    exported, ref = load_weights(out / "model.safetensors"), _file_sd(hub_file)
    for k in ref:
        if k.startswith("features."):
            assert torch.equal(exported[k], ref[k]), k  # frozen: bit for bit the file's weights
    assert not torch.equal(exported["classifier.0.weight"], ref["classifier.0.weight"])  # trained
    tv = torchvision.models.vgg16(num_classes=3)
    tv.load_state_dict(exported, strict=True)
    info = json.loads((out / "model.json").read_text())
    assert info["classes"] == ["ants", "bees", "wasps"] and info["architecture"] == "vgg16"
    assert info["mean"] == [0.485, 0.456, 0.406] and info["std"] == [0.229, 0.224, 0.225]
    trains = [m for m in read_jsonl(out / "metrics.jsonl") if m["event"] == "train"]
    assert trains and trains[-1]["step"] == 2

    # No optimizer state for the frozen features: the checkpoint holds momentum for the classifier only.
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    opt_numel = sum(t.numel() for t in load_weights(latest / "optimizer.safetensors").values())
    head_numel = sum(v.numel() for k, v in exported.items() if k.startswith("classifier."))
    assert head_numel <= opt_numel < head_numel + 1000  # (+ scheduler/scalar entries)

    p = run_distrain(["predict", "--checkpoint", str(out), "--json", str(root / "val" / "bees")], env=env, check=True)
    preds = json.loads(p.stdout)["predictions"]
    assert len(preds) == 3 and all(r["class"] in info["classes"] for r in preds)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_offline_without_the_file_exits_2_naming_it(tmp_path) -> None:
    out = tmp_path / "run"
    env = subprocess_env(TORCH_HOME=tmp_path / "empty", https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9",
                         HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9", no_proxy="", NO_PROXY="")
    p = run_distrain(["train", *_vgg_args(out, **{"model.pretrained": "true"})], env=env, timeout=100)
    expected = tmp_path / "empty" / "hub" / "checkpoints" / VGG16_HUB_FILENAME
    assert p.returncode == 2, p.stderr[-3000:]
    assert str(expected) in p.stderr and "Traceback" not in p.stderr
    assert not (out / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_vgg16_bn_unfreezes_after_one_epoch(tmp_path) -> None:
    """Epoch 1 trains the head only (weights and BatchNorm statistics of the features unchanged), epoch 2 all."""
    f = write_vgg16_weights(tmp_path / "vgg16_bn.pth", seed=6, bn=True)
    out = tmp_path / "run"
    args = ["train", *_vgg_args(out, **{"model.name": "vgg16_bn", "model.weights_path": f, "model.freeze_features": "true",
                                        "model.unfreeze_after_epochs": 1, "train.epochs": 2, "train.max_steps": "null",
                                        "data.max_train_samples": 16, "train.batch_size": 8,
                                        "checkpoint.keep_last": 3})]
    p = run_distrain(args, check=True, timeout=200)
    assert "backbone unfrozen" in p.stderr
    ref = _file_sd(f)
    ckpts = sorted((out / "checkpoints").glob("ckpt-*"))
    after_epoch1 = load_weights(ckpts[0] / "model.safetensors")
    final = load_weights(out / "model.safetensors")
    feats = [k for k in ref if k.startswith("features.")]
    assert all(torch.equal(after_epoch1[k], ref[k]) for k in feats)  # incl. running_mean/var
    assert not torch.equal(final["features.0.weight"], ref["features.0.weight"])
    assert not torch.equal(final["features.1.running_mean"], ref["features.1.running_mean"])  # BN trains again
    torchvision.models.vgg16_bn(num_classes=10).load_state_dict(final, strict=True)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_unfreeze_two_processes_and_resume_across_it(tmp_path) -> None:
    """DDP is rebuilt at the unfreeze; 2 processes, stopped and resumed after it, match one uninterrupted process."""
    common = {"model.name": "cifar10_quick", "model.freeze_features": "true", "model.unfreeze_after_epochs": 1,
              "model.backbone_lr_mult": 0.5, "train.epochs": 2, "train.scheduler": "none", "data.augment": "false",
              "data.max_train_samples": 96, "log.progress": "none"}
    one = tmp_path / "one"
    run_distrain(["train", *smoke_args(one, **common, **{"train.batch_size": 16})], check=True)
    two = tmp_path / "two"
    run_distrain(["train", *smoke_args(two, **common, **{"train.batch_size": 8, "train.max_steps": 8})], nprocs=2, check=True)
    p = run_distrain(["train", *smoke_args(two, **common, **{"train.batch_size": 8})], nprocs=2, check=True)
    assert "resumed from" in p.stderr and "backbone unfrozen" in p.stderr
    a, b = load_weights(one / "model.safetensors"), load_weights(two / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    # ... and the backbone did train in epoch 2.
    first = load_weights(sorted((one / "checkpoints").glob("ckpt-*"))[0] / "model.safetensors")
    assert not torch.equal(first["model.0.weight"], a["model.0.weight"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compile_and_channels_last_export_plain_weights(tmp_path) -> None:
    out = tmp_path / "run"
    run_distrain(["train", *smoke_args(out, **{"model.compile": "true", "model.channels_last": "true",
                                               "data.max_train_samples": 32, "data.max_test_samples": 16,
                                               "train.batch_size": 16, "train.max_steps": 2, "log.progress": "none"})],
                 check=True, timeout=280)
    sd = load_weights(out / "model.safetensors")
    assert not any("_orig_mod" in k or k.startswith("module.") for k in sd)
    build_model("cifar10_quick", num_classes=10).load_state_dict(sd, strict=True)
