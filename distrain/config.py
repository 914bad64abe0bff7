"""Typed run configuration: dataclass defaults, YAML files, dotted KEY=VALUE overrides, validation.

Validation runs on every rank before any process group, data or output work, so a bad config fails the
same way everywhere and never leaves a half-made run directory behind.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from distrain.errors import UserError


def _range(lo=None, hi=None, lo_open=False):
    return {"lo": lo, "hi": hi, "lo_open": lo_open}


@dataclass
class DataConfig:
    name: Literal["cifar10", "synthetic", "imagefolder"] = "cifar10"
    root: str = "data"
    download: bool = True
    verify: bool = True
    augment: bool = True
    max_train_samples: Optional[int] = field(default=None, metadata=_range(lo=1))
    max_test_samples: Optional[int] = field(default=None, metadata=_range(lo=1))
    # device: the whole split lives on the device, batches are gathered and augmented there (fast path);
    # dataloader: a torch DataLoader with workers (image folders, splits that do not fit); auto picks.
    loader: Literal["auto", "device", "dataloader"] = "auto"
    num_workers: Optional[int] = field(default=None, metadata=_range(lo=0))


@dataclass
class ModelConfig:
    # cifar10_quick, any torchvision classification model, or timm:NAME; checked by distrain.model_specs.
    name: str = "cifar10_quick"
    num_classes: int = field(default=10, metadata=_range(lo=2))
    pretrained: bool = False
    # Which pretrained weights (torchvision enum member, e.g. IMAGENET1K_V2; timm tag); null = the default.
    weights: Optional[str] = None
    weights_path: Optional[str] = None
    # ResNet-family stem for 32x32 images: 3x3 stride-1 first conv, no max-pool.
    cifar_stem: bool = False
    # BatchNorm statistics over all processes (SyncBatchNorm) when there is more than one.
    sync_bn: bool = False
    freeze_features: bool = False
    # Unfreeze the backbone after this many epochs (only with freeze_features).
    unfreeze_after_epochs: Optional[int] = field(default=None, metadata=_range(lo=0))
    # Learning-rate multiplier for the backbone (features) parameter group.
    backbone_lr_mult: float = field(default=1.0, metadata=_range(lo=0.0))
    # Side of the square network input; images are resized on the device, never per image through PIL.
    input_size: int = field(default=32, metadata=_range(lo=8, hi=1024))
    channels_last: bool = False
    compile: bool = False


@dataclass
class TrainConfig:
    epochs: int = field(default=20, metadata=_range(lo=1))
    max_steps: Optional[int] = field(default=None, metadata=_range(lo=1))
    batch_size: int = field(default=128, metadata=_range(lo=1))
    grad_accum_steps: int = field(default=1, metadata=_range(lo=1))
    lr: float = field(default=0.01, metadata=_range(lo=0.0, lo_open=True))
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = field(default=0.9, metadata=_range(lo=0.0, hi=1.0))
    nesterov: bool = True
    weight_decay: float = field(default=5e-4, metadata=_range(lo=0.0))
    scheduler: Literal["none", "step", "cosine"] = "cosine"
    warmup_steps: int = field(default=0, metadata=_range(lo=0))
    # step scheduler: multiply the lr by step_gamma every step_epochs epochs (counted in optimizer steps).
    step_epochs: int = field(default=10, metadata=_range(lo=1))
    step_gamma: float = field(default=0.1, metadata=_range(lo=0.0, hi=1.0, lo_open=True))
    label_smoothing: float = field(default=0.0, metadata=_range(lo=0.0, hi=1.0))
    grad_clip: Optional[float] = field(default=None, metadata=_range(lo=0.0, lo_open=True))
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = field(default=0, metadata=_range(lo=0))
    eval_every_epochs: int = field(default=1, metadata=_range(lo=1))
    # Allow resuming with a different global batch (batch_size x world size x grad_accum_steps).
    allow_batch_change: bool = False
    # DDP gradient all-reduce in bf16/fp16 (half the bytes on the wire; VGG16 has 138M gradients), or none.
    ddp_comm_hook: Literal["none", "bf16", "fp16"] = "none"


@dataclass
class CheckpointConfig:
    every_steps: Optional[int] = field(default=None, metadata=_range(lo=1))
    keep_last: int = field(default=2, metadata=_range(lo=1))
    keep_best: bool = True


@dataclass
class LogConfig:
    every_steps: int = field(default=50, metadata=_range(lo=1))
    # bar: a live bar on a terminal; lines: one plain line per interval; auto: bar on a TTY, else lines.
    progress: Literal["auto", "bar", "lines", "none"] = "auto"
    tensorboard: bool = True
    # Write the dataset indices each rank used, in order, to <output_dir>/trace/ (auditing order and sharding).
    trace_samples: bool = False


@dataclass
class Config:
    output_dir: str = "runs/default"
    resume: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def global_batch_per_process(self) -> int:
        return self.train.batch_size * self.train.grad_accum_steps


# --------------------------------------------------------------------------------------------------
# Loading and overriding


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the config, e.g. ``train.lr``."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        keys += all_keys(t, prefix + f.name + ".") if dataclasses.is_dataclass(t) else [prefix + f.name]
    return keys


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _unknown_key(key: str, value: Any = None) -> UserError:
    # An unknown section (`modle.name=...`): name the whole dotted key the user wrote, not just `modle`.
    while isinstance(value, dict) and len(value) == 1:
        (sub, value), = value.items()
        key = f"{key}.{sub}"
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    if not close:  # a typo in the last part only, e.g. train.bach_size
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in all_keys() if difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1]], cutoff=0.75)]
    hint = f"; did you mean '{close[0]}'?" if close else "; see `distrain train --help` for the keys"
    return UserError(f"unknown config key '{key}'{hint}")


def _type_name(t) -> str:
    origin = typing.get_origin(t)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(t))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(t, str(t))


def _coerce(key: str, value: Any, t) -> Any:
    """Check ``value`` against the annotated type ``t``; return it in canonical form or raise UserError."""
    origin = typing.get_origin(t)
    bad = UserError(f"config key '{key}' must be {_type_name(t)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(t)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner:
            try:
                return _coerce(key, value, a)
            except UserError:
                pass
        raise bad
    if origin is Literal:
        choices = typing.get_args(t)
        # YAML reads `no` as False; for precision the user meant the string "no".
        if value is False and "no" in choices:
            value = "no"
        if value not in choices:
            raise bad
        return value
    if t is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if t is str:
        if isinstance(value, (dict, list)) or value is None:
            raise bad
        return str(value)
    raise bad


def _check_range(key: str, value: Any, meta) -> None:
    if value is None or not meta or isinstance(value, bool):
        return
    lo, hi, lo_open = meta.get("lo"), meta.get("hi"), meta.get("lo_open")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        op = ">" if lo_open else ">="
        raise UserError(f"config key '{key}' must be {op} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise UserError(f"config key '{key}' must be <= {hi}, got {value!r}")


def _apply(obj, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}")
    hints = _hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for name, value in data.items():
        key = prefix + str(name)
        if name not in fields:
            raise _unknown_key(key, value)
        sub = getattr(obj, name)
        if dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise UserError(f"config key '{key}' is a section; set its keys, e.g. '{key}.{dataclasses.fields(sub)[0].name}=...'")
            _apply(sub, value, key + ".")
        else:
            value = _coerce(key, value, hints[name])
            _check_range(key, value, fields[name].metadata)
            setattr(obj, name, value)


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise UserError(f"override '{text}' is not KEY=VALUE (e.g. train.lr=0.1)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"override '{text}' has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError:
        value = raw
    # Keep paths and names as written: YAML would turn `1e-3` into a string and `0123` into an int.
    if isinstance(value, str):
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value
    return out


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults, then the YAML file, then each override in order (later wins); validated."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file '{path}' does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise UserError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise UserError(f"config file '{path}' must hold a mapping of keys, got {type(data).__name__}")
        _apply(cfg, _floatify(data))
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: Optional[list[str]]) -> Config:
    """Apply KEY=VALUE overrides in order (later wins) and validate."""
    for text in overrides or []:
        key, value = _parse_override(text)
        _apply(cfg, _floatify(_nest(key, value)))
    validate(cfg)
    return cfg


def _floatify(data):
    """Turn strings like '1e-3' (YAML 1.1 leaves them strings) into floats, recursively."""
    if isinstance(data, dict):
        return {k: _floatify(v) for k, v in data.items()}
    if isinstance(data, str):
        try:
            if any(c in data for c in "eE.") and data.strip().lower() not in ("nan", "inf", "-inf", ".inf"):
                return float(data)
        except ValueError:
            return data
    return data


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config written by ``to_dict`` (e.g. from a checkpoint or a run's config.yaml)."""
    cfg = Config()
    _apply(cfg, data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-key checks that single-key types and ranges cannot express."""
    if cfg.model.weights_path is not None and cfg.model.pretrained:
        raise UserError("config keys 'model.pretrained' and 'model.weights_path' exclude each other; set one")
    from distrain.model_specs import validate_model_config

    validate_model_config(cfg.model)  # model-specific rules live with the model specs
    if cfg.model.unfreeze_after_epochs is not None and not cfg.model.freeze_features:
        raise UserError("config key 'model.unfreeze_after_epochs' needs model.freeze_features=true")
    if cfg.resume not in ("auto", "none") and not cfg.resume.strip():
        raise UserError("config key 'resume' must be auto, none or a checkpoint path")
    if not str(cfg.output_dir).strip():
        raise UserError("config key 'output_dir' must not be empty")


def dump_config(cfg: Config, path: Path) -> None:
    """Write the resolved config atomically (a crash leaves the old file or the new one, never half)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(cfg.to_yaml())
    os.replace(tmp, path)
