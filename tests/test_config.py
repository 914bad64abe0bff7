"""Config: defaults, YAML + overrides (later wins), validation that names the key."""

from pathlib import Path

import pytest
import yaml

from distrain.config import all_keys, config_from_dict, load_config
from distrain.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_train_cifar10_quick():
    cfg = load_config()
    assert cfg.model.name == "cifar10_quick" and cfg.data.name == "cifar10"
    assert cfg.train.batch_size > 0 and cfg.train.lr > 0 and cfg.resume == "auto"


@pytest.mark.parametrize("name", ["cifar10_quick.yaml", "vgg16.yaml", "smoke.yaml"])
def test_shipped_configs_load(name):
    path = REPO / "configs" / name
    if not path.exists():
        pytest.fail(f"configs/{name} is missing")
    load_config(str(path))


def test_yaml_then_overrides_later_wins(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"train": {"lr": 0.2, "batch_size": 16}, "data": {"name": "synthetic"}}))
    cfg = load_config(str(f), ["train.lr=0.3", "train.lr=1e-3", "data.augment=false", "train.max_steps=7"])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.batch_size == 16 and cfg.data.name == "synthetic"
    assert cfg.data.augment is False and cfg.train.max_steps == 7


def test_precision_no_is_not_yaml_false():
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_null_and_paths():
    cfg = load_config(None, ["data.max_train_samples=null", "output_dir=runs/v1.2", "model.weights_path=~/w.pth",
                             "model.name=vgg16"])
    assert cfg.data.max_train_samples is None and cfg.output_dir == "runs/v1.2"
    assert cfg.model.weights_path == "~/w.pth"


@pytest.mark.parametrize("override, needle", [
    ("train.bach_size=3", "did you mean 'train.batch_size'"),
    ("trian.lr=0.1", "unknown config key 'trian"),
    ("train.lr=-1", "train.lr"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.batch_size=2.5", "train.batch_size"),
    ("model.name=resnet", "model.name"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("data.augment=maybe", "data.augment"),
    ("train.epochs=true", "train.epochs"),
    ("train=3", "'train' is a section"),
    ("train.lr", "KEY=VALUE"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(UserError, match=None) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_cross_key_checks():
    with pytest.raises(UserError, match="model.input_size"):
        load_config(None, ["model.input_size=64"])
    with pytest.raises(UserError, match="exclude each other"):
        load_config(None, ["model.name=vgg16", "model.pretrained=true", "model.weights_path=w.pth"])


def test_config_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(bad))
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(str(lst))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(UserError, match="train.lrr.*train.lr"):
        load_config(str(unknown))


def test_round_trip_through_dict():
    cfg = load_config(None, ["train.lr=0.2", "data.name=synthetic", "train.grad_accum_steps=3"])
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_every_key_listed():
    keys = all_keys()
    for k in ["output_dir", "data.name", "data.root", "data.download", "data.verify", "data.augment",
              "data.max_train_samples", "data.max_test_samples", "model.name", "model.num_classes",
              "model.pretrained", "model.weights_path", "model.freeze_features", "train.epochs", "train.max_steps",
              "train.batch_size", "train.grad_accum_steps", "train.lr", "train.optimizer", "train.scheduler",
              "train.mixed_precision", "train.seed", "checkpoint.every_steps", "checkpoint.keep_last", "resume"]:
        assert k in keys, k
