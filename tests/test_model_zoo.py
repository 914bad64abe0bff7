"""Any torchvision classifier (and timm's): specs, heads, weights, freezing, CIFAR stem, export,
listing.

Stand-in weight files come from fakes.write_model_weights (torchvision's / timm's exact keys and
shapes, random values, built on the meta device); nothing is downloaded. Big models (vit_b_16,
convnext_tiny) only forward a couple of images; everything that trains uses 32x32 inputs and a few
steps.
"""

from __future__ import annotations

import copy
import json
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from conftest import load_weights, run_distrain, smoke_args, subprocess_env
from distrain.config import Config, ModelConfig, TrainConfig, apply_overrides
from distrain.cross_rank_bn import CrossRankBatchNorm, convert
from distrain.errors import UserError
from distrain.model_specs import preprocessing, spec_for
from distrain.models import check_input_size
from distrain.models import backbone_and_head, build_from_config, build_model, builder_kwargs
from distrain.optim import build_optimizer
from distrain.weights import hub_path, load_pretrained, prepare_weights
from fakes import hub_weights_path, random_state_dict, write_hf_cache_file, write_model_weights

FAMILIES = {  # name: (input size the test uses, expected head, expected trainable head group)
    "resnet18": (32, "fc", ("fc",)),
    "efficientnet_b0": (32, "classifier.1", ("classifier",)),
    "convnext_tiny": (32, "classifier.2", ("classifier",)),
    "vit_b_16": (
        224,
        "heads.head",
        ("heads",),
    ),  # its native size: position embeddings as in the file
    "mobilenet_v3_small": (32, "classifier.3", ("classifier",)),
}


class _Cfg:  # just what prepare_weights reads
    def __init__(self, **model):
        self.model = ModelConfig(**model)


def _offline(monkeypatch) -> None:
    def no_network(url, dst, *a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


def _fresh(mcfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_from_config(mcfg)


# -- specs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_spec_head_is_found_generically(name) -> None:
    _, head, group = FAMILIES[name]
    spec = spec_for(name)
    assert spec.head == head and spec.head_group == group and spec.native_size == 224
    assert spec.default_weights in spec.weights
    m = build_model(name, num_classes=7, input_size=FAMILIES[name][0])
    assert m.get_submodule(head).weight.shape[0] == 7
    bb, hd = backbone_and_head(m)
    assert len(bb) + len(hd) == len(list(m.parameters())) and hd and bb
    assert {id(p) for p in hd} == {id(p) for g in group for p in m.get_submodule(g).parameters()}


def test_squeezenet_conv_head_and_aux_free_inception() -> None:
    assert spec_for("squeezenet1_1").head == "classifier.1"  # a Conv2d classifier
    g = spec_for("googlenet")
    assert (
        g.head == "fc"
        and g.ignored_prefixes == ("aux1", "aux2")
        and g.build_kwargs["aux_logits"] is False
    )
    m = build_model("googlenet", num_classes=3).train()
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 3)  # plain logits in train mode, no aux tuple


def test_unknown_names_get_suggestions_and_timm_needs_its_extra(monkeypatch) -> None:
    with pytest.raises(UserError, match=r"unknown model 'resnet19'; did you mean .*resnet18"):
        spec_for("resnet19")
    with pytest.raises(
        UserError, match="unknown model 'timm:resnett18'; did you mean timm:resnet18"
    ):
        apply_overrides(Config(), ["model.name=timm:resnett18"])
    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed
    with pytest.raises(UserError, match=r"distrain\[timm\]"):
        spec_for("timm:someothername")


def test_config_rules_live_with_the_spec() -> None:
    cases = {
        "model.weights=IMAGENET1K_V9": "no weights 'IMAGENET1K_V9'; choose one of IMAGENET1K_V1",
        "model.cifar_stem=true": "efficientnet_b0 has no ResNet stem",
    }
    for override, msg in cases.items():
        over = ["model.name=efficientnet_b0", override] + (
            ["model.pretrained=true"] if "weights" in override else []
        )
        with pytest.raises(UserError, match=msg):
            apply_overrides(Config(), over)
    with pytest.raises(UserError, match="model.weights' picks pretrained weights"):
        apply_overrides(Config(), ["model.name=resnet50", "model.weights=IMAGENET1K_V2"])
    with pytest.raises(UserError, match="alexnet cannot take 32x32 inputs"):
        check_input_size("alexnet", 32)
    cfg = apply_overrides(
        Config(), ["model.name=resnet50", "model.pretrained=true", "model.weights=IMAGENET1K_V2"]
    )
    v1, v2 = (
        Path(w.url).name
        for w in (
            torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
            torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
        )
    )
    assert (
        hub_path("resnet50", "IMAGENET1K_V2").name == v2
        and hub_path("resnet50", "IMAGENET1K_V1").name == v1
    )
    mean, std, resize, crop = preprocessing(cfg.model, "imagefolder")
    # The V2 weights' own eval transform (resize 232, crop 224), scaled to the input size.
    assert (resize, crop) == (round(32 * 232 / 224), 32) and mean == (0.485, 0.456, 0.406)


# -- weights -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_hub_weights_load_all_but_the_head_and_export_fits_torchvision(
    name, tmp_path, monkeypatch
) -> None:
    size = FAMILIES[name][0]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    _offline(monkeypatch)  # the file is in the cache: nothing may be fetched
    f = write_model_weights(hub_weights_path(tmp_path / "th", name), name, seed=1)
    mcfg = ModelConfig(name=name, num_classes=5, pretrained=True, input_size=size)
    prepare_weights(_Cfg(name=name, pretrained=True))
    model = _fresh(mcfg)
    head = spec_for(name).head + "."
    fresh_head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(head)}
    load_pretrained(model, mcfg)
    sd, ref = model.state_dict(), torch.load(f, weights_only=True)
    for k, v in sd.items():
        assert torch.equal(
            v, fresh_head[k] if k.startswith(head) else ref[k]
        ), k  # the file, bit for bit
    assert sd[head + "weight"].shape[0] == 5 and ref[head + "weight"].shape[0] == 1000
    tv = torchvision.models.get_model(name, num_classes=5, **builder_kwargs(spec_for(name), size))
    tv.load_state_dict(sd, strict=True)  # the export promise
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, size, size)).shape == (2, 5)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_offline_missing_and_wrong_shape_files_are_user_errors(name, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    _offline(monkeypatch)
    expected = hub_weights_path(tmp_path / "empty", name)
    with pytest.raises(UserError) as e:
        prepare_weights(_Cfg(name=name, pretrained=True))
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    assert str(expected) in str(e.value) and url in str(e.value)
    mcfg = ModelConfig(name=name, input_size=FAMILIES[name][0])
    with torch.device("meta"):
        model = build_from_config(mcfg)
    sd = random_state_dict(model)
    key = next(k for k, v in sd.items() if v.ndim == 4 or (v.ndim == 3 and "pos" in k))
    sd[key] = torch.zeros(*[d + 1 for d in sd[key].shape])
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(UserError) as e:
        load_pretrained(
            model, ModelConfig(name=name, input_size=mcfg.input_size, weights_path=str(bad))
        )
    assert "model.weights_path" in str(e.value) and str(bad) in str(e.value) and key in str(e.value)


def test_vit_weights_follow_the_input_size(tmp_path) -> None:
    """vit_b_16 built for 32x32 (4 patches): the file's 14x14 position embeddings interpolated."""
    f = write_model_weights(tmp_path / "vit.pth", "vit_b_16", seed=2)
    mcfg = ModelConfig(name="vit_b_16", num_classes=3, input_size=32, weights_path=str(f))
    model = _fresh(mcfg)
    load_pretrained(model, mcfg)
    sd, ref = model.state_dict(), torch.load(f, weights_only=True)
    assert sd["encoder.pos_embedding"].shape == (1, 5, 768)
    cls_token = ref["encoder.pos_embedding"][:, 0]
    assert torch.equal(sd["encoder.pos_embedding"][:, 0], cls_token)
    assert torch.equal(sd["conv_proj.weight"], ref["conv_proj.weight"])
    tv = torchvision.models.get_model(
        "vit_b_16", num_classes=3, **builder_kwargs(spec_for("vit_b_16"), 32)
    )
    tv.load_state_dict(sd, strict=True)


def test_cifar_stem_loads_everything_but_conv1(tmp_path) -> None:
    f = write_model_weights(tmp_path / "r18.pth", "resnet18", seed=3)
    mcfg = ModelConfig(name="resnet18", cifar_stem=True, weights_path=str(f))
    model = _fresh(mcfg)
    conv1 = model.conv1.weight.clone()
    assert conv1.shape == (64, 3, 3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    load_pretrained(model, mcfg)
    ref = torch.load(f, weights_only=True)
    assert torch.equal(model.conv1.weight, conv1) and torch.equal(
        model.layer1[0].conv1.weight, ref["layer1.0.conv1.weight"]
    )
    build_model("resnet18", num_classes=10, cifar_stem=True).load_state_dict(
        model.state_dict(), strict=True
    )
    with pytest.raises(RuntimeError, match="conv1.weight"):
        torchvision.models.resnet18(num_classes=10).load_state_dict(model.state_dict(), strict=True)


# -- freezing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_frozen_backbone_stays_bit_identical_bn_statistics_too(name) -> None:
    """As the engine does it: backbone frozen (no optimizer state), its BatchNorm in eval mode."""
    mcfg = ModelConfig(name=name, num_classes=4, freeze_features=True, backbone_lr_mult=0.1)
    model = _fresh(mcfg)
    backbone, head = backbone_and_head(model)
    for p in backbone:
        p.requires_grad_(False)
    opt = build_optimizer(model, TrainConfig(lr=0.1), mcfg)
    ids = {id(p) for p in head}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in m.parameters()
        ):
            m.eval()
    for _ in range(2):
        model(torch.randn(4, 3, 32, 32)).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    head_keys = {k for k, v in model.named_parameters() if id(v) in ids}
    for k, v in model.state_dict().items():
        if k in head_keys:
            continue
        assert torch.equal(v, before[k]), k  # weights and running statistics
    assert any(not torch.equal(model.state_dict()[k], before[k]) for k in head_keys)


def test_backbone_lr_multiplier_groups() -> None:
    mcfg = ModelConfig(name="convnext_tiny", backbone_lr_mult=0.1)
    with torch.device("meta"):
        model = build_from_config(mcfg)
    groups = {
        g["name"]: g["lr"]
        for g in build_optimizer(model, TrainConfig(lr=1.0), mcfg, "meta").param_groups
    }
    assert groups == {"backbone": 0.1, "backbone_no_decay": 0.1, "head": 1.0, "head_no_decay": 1.0}


def test_sync_bn_converts_and_keeps_the_state_dict_keys() -> None:
    from distrain.models import convert_sync_batchnorm

    model = build_model("resnet18", num_classes=3, cifar_stem=True)
    keys = list(model.state_dict())
    # One process: plain BatchNorm.
    assert convert_sync_batchnorm(model, 1) is model
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    synced = convert_sync_batchnorm(model, 2, "cuda")
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    assert list(synced.state_dict()) == keys
    with pytest.raises(UserError, match="model.sync_bn"):  # CPU processes need an all-reduce
        convert_sync_batchnorm(build_model("resnet18"), 2, "cpu")
    cpu = convert_sync_batchnorm(build_model("resnet18", num_classes=3), 2, "cpu", lambda t: t)
    assert isinstance(cpu.bn1, CrossRankBatchNorm) and list(cpu.state_dict()) == keys


def test_cross_rank_batchnorm_on_one_rank_is_batchnorm() -> None:
    """With the identity as the all-reduce (one rank) it computes what BatchNorm2d computes."""
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(5, momentum=0.3)
    torch.nn.init.normal_(ref.weight)
    ours = torch.nn.Sequential(copy.deepcopy(ref))
    ours = convert(ours, lambda t: t)[0]
    assert isinstance(ours, CrossRankBatchNorm)
    x = torch.randn(6, 5, 4, 3) * 3 + 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa), ours(xb)
    w = torch.randn_like(ya)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    assert torch.allclose(ya, yb, atol=1e-5) and torch.allclose(xa.grad, xb.grad, atol=1e-5)
    assert torch.allclose(ref.weight.grad, ours.weight.grad, atol=1e-4)
    for k, v in ref.state_dict().items():
        assert torch.allclose(v.float(), ours.state_dict()[k].float(), atol=1e-5), k
    ref.eval(), ours.eval()
    assert torch.allclose(ref(x), ours(x), atol=1e-5)


# -- timm ----------------------------------------------------------------------------------------


def test_timm_model_loads_a_stand_in_file_from_the_hf_cache(tmp_path, monkeypatch) -> None:
    pytest.importorskip("timm", reason="the timm extra is not installed")
    import huggingface_hub.constants as hfc

    name = "timm:test_resnet"
    spec = spec_for(name)
    assert spec.is_timm and spec.weights and spec.head == "fc"
    from distrain.weights import _timm_repo

    repo, files = _timm_repo(spec, None)
    src = write_model_weights(tmp_path / "src.safetensors", name, seed=4)
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    mcfg = ModelConfig(name=name, num_classes=3, pretrained=True)
    with pytest.raises(UserError, match=f"huggingface.co/{repo}"):
        load_pretrained(_fresh(mcfg), mcfg)  # nothing in the cache yet
    write_hf_cache_file(tmp_path / "hf", repo, files[0], src)
    model = _fresh(mcfg)
    load_pretrained(model, mcfg)
    from safetensors.torch import load_file

    ref = load_file(str(src))
    for k, v in model.state_dict().items():
        assert v.shape[0] == 3 if k.startswith("fc.") else torch.equal(v, ref[k]), k
    import timm

    # The pretrained config's statistics, not CIFAR-10's.
    mean, std, _, _ = preprocessing(mcfg, "cifar10")
    expected = timm.models.get_pretrained_cfg(f"{spec.arch}.{spec.default_weights}")
    assert mean == tuple(expected.mean) and std == tuple(expected.std)


# -- listing -------------------------------------------------------------------------------------


def test_models_command_lists_names_counts_and_weights(capsys) -> None:
    from distrain.cli import main

    assert main(["models", "--json", "--pretrained", "resnet"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["models"]}
    assert "cifar10_quick" not in rows and {"resnet18", "resnet50", "wide_resnet50_2"} <= set(rows)
    assert rows["resnet50"]["params"] == sum(
        p.numel() for p in torchvision.models.resnet50().parameters()
    )
    assert rows["resnet50"]["native_size"] == 224 and "IMAGENET1K_V2" in rows["resnet50"]["weights"]
    assert main(["models", "resnt"]) == 2
    err = capsys.readouterr().err
    assert "did you mean" in err and "resnet18" in err and "Traceback" not in err


# -- end to end ----------------------------------------------------------------------------------


def _tiny(out: Path, **over) -> list[str]:
    base = {
        "data.max_train_samples": 32,
        "data.max_test_samples": 16,
        "train.batch_size": 16,
        "train.max_steps": 2,
        "log.every_steps": 1,
        "log.progress": "none",
    }
    base.update(over)
    return smoke_args(out, **base)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_resnet18_pretrained_frozen_trains_exports_evaluates_predicts(tmp_path) -> None:
    """Hub stand-in, frozen backbone (BN statistics too), export into torchvision, eval and predict
    on a CPU."""
    f = write_model_weights(hub_weights_path(tmp_path / "th", "resnet18"), "resnet18", seed=5)
    env = subprocess_env(
        TORCH_HOME=tmp_path / "th",
        https_proxy="http://127.0.0.1:9",
        http_proxy="http://127.0.0.1:9",
    )
    out = tmp_path / "run"
    run_distrain(
        [
            "train",
            *_tiny(
                out,
                **{
                    "model.name": "resnet18",
                    "model.pretrained": "true",
                    "model.freeze_features": "true",
                    "model.num_classes": 10,
                },
            ),
        ],
        env=env,
        check=True,
    )
    exported, ref = load_weights(out / "model.safetensors"), torch.load(f, weights_only=True)
    for k, v in exported.items():
        if not k.startswith("fc."):
            assert torch.equal(v, ref[k]), k
    assert not torch.equal(exported["fc.bias"], torch.zeros(10))
    torchvision.models.get_model("resnet18", num_classes=10).load_state_dict(exported, strict=True)
    info = json.loads((out / "model.json").read_text())
    assert info["architecture"] == "resnet18" and info["mean"] == [0.485, 0.456, 0.406]
    assert info["cifar_stem"] is False and info["builder_kwargs"] == {}
    p = run_distrain(
        ["eval", "--checkpoint", str(out / "model.safetensors"), "--json"], env=env, check=True
    )
    assert json.loads(p.stdout)["samples"] == 16


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cifar_stem_resnet18_from_scratch_resumes_and_predicts(tmp_path) -> None:
    out = tmp_path / "run"
    over = {"model.name": "resnet18", "model.cifar_stem": "true", "train.max_steps": 1}
    run_distrain(["train", *_tiny(out, **over)], check=True)
    p = run_distrain(["train", *_tiny(out, **{**over, "train.max_steps": 2})], check=True)
    assert "resumed from" in p.stderr
    sd = load_weights(out / "model.safetensors")
    build_model("resnet18", num_classes=10, cifar_stem=True).load_state_dict(sd, strict=True)
    assert json.loads((out / "model.json").read_text())["cifar_stem"] is True
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    p = run_distrain(
        ["predict", "--checkpoint", str(out), "--json", str(tmp_path / "red.png")], check=True
    )
    assert len(json.loads(p.stdout)["predictions"]) == 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_equal_one_for_a_model_without_batchnorm(tmp_path) -> None:
    """timm's tiny ViT (no BatchNorm, no dropout) at 32x32: 2 processes x B/2 == 1 process x B."""
    pytest.importorskip("timm", reason="the timm extra is not installed")
    common = {
        "model.name": "timm:test_vit",
        "model.input_size": 32,
        "data.augment": "false",
        "train.scheduler": "none",
        "train.max_steps": 3,
        "train.lr": 0.05,
    }
    one, two = tmp_path / "one", tmp_path / "two"
    run_distrain(["train", *_tiny(one, **common, **{"train.batch_size": 8})], check=True)
    run_distrain(["train", *_tiny(two, **common, **{"train.batch_size": 4})], nprocs=2, check=True)
    a, b = load_weights(one / "model.safetensors"), load_weights(two / "model.safetensors")
    start = build_model("timm:test_vit", num_classes=10, input_size=32)
    assert any(not torch.equal(a[k], v) for k, v in start.state_dict().items())  # it did train
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_with_sync_bn_equal_one(tmp_path) -> None:
    """A BatchNorm model (timm's tiny ResNet, no dropout) with model.sync_bn on 2 CPU processes x
    B/2 ends with the weights and running statistics of 1 process x B."""
    pytest.importorskip("timm", reason="the timm extra is not installed")
    common = {"model.name": "timm:test_resnet", "model.sync_bn": "true", "data.augment": "false",
              "train.scheduler": "none", "train.max_steps": 3, "train.lr": 0.05}
    one, two = tmp_path / "one", tmp_path / "two"
    run_distrain(["train", *_tiny(one, **common, **{"train.batch_size": 8})], check=True)
    run_distrain(["train", *_tiny(two, **common, **{"train.batch_size": 4})], nprocs=2, check=True)
    a, b = load_weights(one / "model.safetensors"), load_weights(two / "model.safetensors")
    stats = [k for k in a if k.endswith("running_mean")]
    assert stats and all(not torch.equal(a[k], torch.zeros_like(a[k])) for k in stats)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-4
