"""Typed run configuration: dataclass defaults, YAML files, dotted KEY=VALUE overrides, validation.

Validation runs on every rank before any process group, data or output work, so a bad config fails
the same way everywhere and never leaves a half-made run directory behind.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from distrain import yamlio
from distrain.errors import UserError, shorten, shorten_text
from distrain.fsio import atomic_write_text


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
    # device: the whole split lives on the device, batches are gathered and augmented there (fast
    # path); dataloader: a torch DataLoader with workers (image folders, splits that do not fit);
    # auto picks.
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
    # Side of the square network input; images are resized on the device, never one by one in PIL.
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
    # step scheduler: the lr times step_gamma every step_epochs epochs (counted in optimizer steps).
    step_epochs: int = field(default=10, metadata=_range(lo=1))
    step_gamma: float = field(default=0.1, metadata=_range(lo=0.0, hi=1.0, lo_open=True))
    label_smoothing: float = field(default=0.0, metadata=_range(lo=0.0, hi=1.0))
    grad_clip: Optional[float] = field(default=None, metadata=_range(lo=0.0, lo_open=True))
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # 0 .. 2**32-1: what every seeded library (numpy's legacy seeding, DataLoader workers) accepts.
    seed: int = field(default=0, metadata=_range(lo=0, hi=2**32 - 1))
    eval_every_epochs: int = field(default=1, metadata=_range(lo=1))
    # Evaluation batches run before the first training step, so a broken eval path fails in seconds.
    sanity_eval_batches: int = field(default=2, metadata=_range(lo=0))
    # Allow resuming with a different global batch (batch_size x world size x grad_accum_steps).
    allow_batch_change: bool = False
    # DDP gradient all-reduce in bf16/fp16 (half the bytes on the wire; VGG16 has 138M gradients).
    ddp_comm_hook: Literal["none", "bf16", "fp16"] = "none"
    # Seconds a silent peer (frozen or lost process or node) may hold up the others before every rank stops,
    # naming it (distrain/watchdog.py, exit 1); null turns the watchdog off.
    peer_timeout_s: Optional[float] = field(default=120.0, metadata=_range(lo=5.0))
    # Seconds one collective may wait before the backend fails it (the process group's timeout). Rank 0's data
    # preparation and downloads happen while the others wait in one, so keep it well above their duration.
    collective_timeout_s: float = field(default=900.0, metadata=_range(lo=10.0))


@dataclass
class CheckpointConfig:
    every_steps: Optional[int] = field(default=None, metadata=_range(lo=1))
    keep_last: int = field(default=2, metadata=_range(lo=1))
    keep_best: bool = True


@dataclass
class LogConfig:
    every_steps: int = field(default=50, metadata=_range(lo=1))
    # bar: a live bar on a terminal; lines: one plain line per interval; auto: bar on a TTY.
    progress: Literal["auto", "bar", "lines", "none"] = "auto"
    tensorboard: bool = True
    # Where metrics go besides metrics.jsonl (always written): tensorboard (<output_dir>/tb; needs
    # log.tensorboard too), csv (<output_dir>/metrics.csv), mlflow, wandb. Main process only.
    trackers: list[Literal["tensorboard", "csv", "mlflow", "wandb"]] = field(
        default_factory=lambda: ["tensorboard"])
    # MLflow server or store; null: $MLFLOW_TRACKING_URI, else SQLite in <output_dir>/mlruns.
    mlflow_uri: Optional[str] = None
    # MLflow experiment / W&B project; null: the config file's name (`-c FILE`), else "distrain".
    experiment: Optional[str] = None
    # The run's name in MLflow / W&B; null: the name of output_dir.
    run_name: Optional[str] = None
    # Write the dataset indices each rank used, in order, to <output_dir>/trace/ (auditing order and
    # sharding).
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

_INT_MAX = 2**63 - 1  # every integer key fits an int64 (torch's) unless its own range says less
_INT_TEXT = re.compile(r"\s*[-+]?[0-9](_?[0-9])*\s*")
# Keys that name files or directories: a leading `~` is the user's home (see `expand_paths`).
PATH_KEYS = ("output_dir", "data.root", "model.weights_path", "resume")
# What `distrain eval` takes from a run's config and its KEY=VALUE overrides (the model comes from
# the checkpoint); a section name ending in '.' stands for all its keys.
EVAL_KEYS = ("data.", "train.batch_size", "train.seed", "train.device", "train.mixed_precision",
             "model.channels_last")


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the config, e.g. ``train.lr``."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        is_section = dataclasses.is_dataclass(t)
        keys += all_keys(t, prefix + f.name + ".") if is_section else [prefix + f.name]
    return keys


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _unknown_key(key: str, value: Any = None) -> UserError:
    # An unknown section (`modle.name=...`): name the whole dotted key the user wrote, not `modle`.
    while isinstance(value, dict) and len(value) == 1:
        (sub, value), = value.items()
        key = f"{key}.{sub}"
    key = shorten_text(key)
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    if not close:  # a typo in the last part only, e.g. train.bach_size
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in all_keys()
                 if difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1]], cutoff=0.75)]
    hint = f"; did you mean '{close[0]}'?" if close else "; see `distrain train --help` for keys"
    return UserError(f"unknown config key '{key}'{hint}")


def _type_name(t) -> str:
    origin = typing.get_origin(t)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(t))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return "a list of " + _type_name(typing.get_args(t)[0])
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(t, str(t))


def _from_source(leaf: yamlio.Scalar, t) -> Any:
    """Read a YAML scalar or a KEY=VALUE text by the key's type ``t``; `_coerce` checks the result.

    String keys keep the text as written: YAML's own typing would make `0123` the integer 83 and
    `1:30` the integer 90. Numbers are read from the text too (YAML 1.1 leaves `1e-3` a string).
    """
    text = leaf.text if leaf.plain else (leaf.value if isinstance(leaf.value, str) else None)
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        if leaf.value is None:
            return None
        (t,) = [a for a in typing.get_args(t) if a is not type(None)]
        origin = typing.get_origin(t)
    if origin is Literal or t is str:
        # A plain `~` is YAML's null, but for a path key (a string, never null) it is the home.
        if leaf.value is None and not (t is str and leaf.plain and leaf.text.strip() == "~"):
            return None
        return (text.strip() if origin is Literal else text) if text is not None else leaf.value
    if t in (int, float) and text is not None:
        return _number(text, t, leaf.value)
    return leaf.value


def _number(text: str, t, yaml_value: Any) -> Any:
    """A number from its text, or the text itself (refused by `_coerce`, naming what was written).

    Python's reading, not YAML 1.1's: `010` is ten (not octal eight), `1:30` no number (not 90).
    """
    try:
        if t is float:
            return float(text)  # `1e400` becomes inf here and is refused by _coerce
        if _INT_TEXT.fullmatch(text):
            return int(text)
        if text.strip()[:2].lower() in ("0x", "0o", "0b"):
            return int(text, 0)
    except ValueError:  # not a number, or more digits than Python converts
        pass
    # YAML's own spellings of infinity and NaN (`.inf`, `.NaN`): refused as such by _coerce.
    if isinstance(yaml_value, float) and not math.isfinite(yaml_value):
        return yaml_value
    return text


def _coerce(key: str, value: Any, t, shown=None) -> Any:
    """Check ``value`` against the annotated type ``t``: its canonical form, or a UserError.

    ``shown`` is the type that a type mismatch names (an Optional's, for its inner type's check).
    """
    origin = typing.get_origin(t)
    bad = UserError(f"config key '{key}' must be {_type_name(shown or t)}, got {shorten(value)}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(t)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner, shown=t)
    if origin is Literal:
        # YAML reads `no` as False; for precision the user meant the string "no".
        if value is False and "no" in typing.get_args(t):
            value = "no"
        if not isinstance(value, str) or value not in typing.get_args(t):
            raise bad
        return value
    if origin is list:  # a YAML list, or one item written alone (`log.trackers=mlflow`)
        items = value if isinstance(value, list) else [value]
        (item_type,) = typing.get_args(t)
        try:
            return [_coerce(key, v, item_type) for v in items]
        except UserError:
            raise bad from None
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
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise UserError(f"config key '{key}' must be a finite number, got {shorten(value)}")
        return value
    if t is str:
        if isinstance(value, (dict, list)) or value is None:
            raise bad
        value = str(value)
        if any(ord(c) < 32 or ord(c) == 127 for c in value):  # a pasted newline or tab, never meant
            raise UserError(f"config key '{key}' must not contain control characters (newline, tab, "
                            f"...), got {shorten(value)}")
        return value
    raise bad


def _check_range(key: str, value: Any, meta) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    meta = meta or {}
    lo, hi, lo_open = meta.get("lo"), meta.get("hi"), meta.get("lo_open")
    if hi is None and isinstance(value, int):
        hi = _INT_MAX
    if lo is not None and (value < lo or (lo_open and value == lo)):
        op = ">" if lo_open else ">="
        raise UserError(f"config key '{key}' must be {op} {lo}, got {shorten(value)}")
    if hi is not None and value > hi:
        raise UserError(f"config key '{key}' must be <= {hi}, got {shorten(value)}")


class _Located(UserError):
    """A config error that already says where in a file it is."""


def _apply(obj, data: dict, prefix: str = "", src: str = "") -> None:
    """Set the keys in ``data`` (plain values, or `yamlio` trees from ``src``, a file's name)."""
    if not isinstance(data, dict):
        section = prefix.rstrip(".") or "<top>"
        raise UserError(f"config section '{section}' must be a mapping, got {shorten(data)}")
    for name, value in data.items():
        where = ""
        if isinstance(data, yamlio.Section) and src:
            where = f" (in {src} line {abs(data.key_lines.get(name, 0))})"
        try:
            _apply_one(obj, str(name), value, prefix, src)
        except _Located:
            raise
        except UserError as e:
            raise (_Located(f"{e}{where}") if where else e) from None


def _apply_one(obj, name: str, value: Any, prefix: str, src: str) -> None:
    key = prefix + name
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if name not in fields:
        if src and "." in name:
            raise _dotted_in_yaml(key, value)
        raise _unknown_key(key, value)
    sub = getattr(obj, name)
    if dataclasses.is_dataclass(sub):
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' is a section; set its keys, e.g. "
                            f"'{key}.{dataclasses.fields(sub)[0].name}=...'")
        _apply(sub, value, key + ".", src)
        return
    t = _hints(type(obj))[name]
    if isinstance(value, dict) and not isinstance(value, yamlio.Section):  # `train.lr.x=1`
        raise _unknown_key(key, value)
    if isinstance(value, yamlio.Scalar):
        value = _from_source(value, t)
    elif isinstance(value, yamlio.Section):
        value = yamlio.plain(value)
    value = _coerce(key, value, t)
    _check_range(key, value, fields[name].metadata)
    setattr(obj, name, value)


def _dotted_in_yaml(key: str, value: Any) -> UserError:
    parts = key.split(".")
    shown = value.text if isinstance(value, yamlio.Scalar) and value.plain else "..."
    nested = " ".join(f"'{'  ' * i}{p}:'" for i, p in enumerate(parts[:-1]))
    leaf = f"{'  ' * (len(parts) - 1)}{parts[-1]}: {shorten_text(shown, 40)}"
    hint = f"write {nested} and under it '{leaf}'"
    if key not in all_keys():
        return UserError(f"{_unknown_key(key)}; and YAML nests keys: {hint}")
    return UserError(f"key '{shorten_text(key)}' has dots: YAML nests keys (dotted keys are for "
                     f"KEY=VALUE overrides); {hint}")


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise UserError(f"override '{shorten_text(text)}' is not KEY=VALUE (e.g. train.lr=0.1)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"override '{shorten_text(text)}' has no key")
    try:
        tree = yamlio.parse(raw) if raw.strip() else None
    except (yaml.YAMLError, yamlio.YamlProblem):
        tree = None if not raw.strip() else yamlio.Scalar(raw, raw, True)
    if isinstance(tree, yamlio.Section):  # a whole section: data={name: synthetic, augment: false}
        return key, tree
    # The text as written (not YAML's reading of it) decides, by the key's type: see _from_source.
    return key, yamlio.Scalar(raw, None if tree is None else tree.value, True)


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value
    return out


def read_yaml_mapping(path: str, what: str) -> yamlio.Section:
    """The mapping in a YAML file (see yamlio.read_text for what ``path`` may be), or UserError."""
    text = yamlio.read_text(path, what)
    try:
        tree = yamlio.parse(text)
    except (yaml.YAMLError, yamlio.YamlProblem) as e:
        raise UserError(f"{what} is not valid YAML: {yamlio.describe_problem(e)}") from None
    if tree is None:
        return yamlio.Section()
    if not isinstance(tree, yamlio.Section):
        kind = type(tree.value).__name__ if tree.value is not None else "null"
        raise UserError(f"{what} must hold a mapping of keys, got {kind}")
    return tree


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults, the YAML file (``-``: stdin), each override in order (later wins); validated."""
    cfg = Config()
    if path is not None:
        name = "<stdin>" if path == "-" else shorten_text(path, 200)
        _apply(cfg, read_yaml_mapping(path, f"config file '{name}'"), src=f"'{name}'")
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: Optional[list[str]]) -> Config:
    """Apply KEY=VALUE overrides in order (later wins) and validate."""
    for text in overrides or []:
        key, value = _parse_override(text)
        _apply(cfg, _nest(key, value))
    validate(cfg)
    return cfg


def expand_paths(cfg: Config) -> Config:
    """Expand a leading ``~`` in the path keys (``resume`` only when it is a path); returns ``cfg``.

    A separate step from loading: the parsed config is what the user wrote, the expanded one is what
    runs and what config.yaml records.
    """
    for key in PATH_KEYS:
        section, _, name = key.rpartition(".")
        obj = getattr(cfg, section) if section else cfg
        value = getattr(obj, name)
        if value is None or (key == "resume" and value in ("auto", "none")):
            continue
        setattr(obj, name, os.path.expanduser(value))
    return cfg


def is_eval_key(key: str) -> bool:
    return any(key == k or (k.endswith(".") and (key.startswith(k) or key == k[:-1]))
               for k in EVAL_KEYS)


def check_eval_overrides(overrides: Optional[list[str]]) -> None:
    """`distrain eval` overrides: known keys that eval uses (EVAL_KEYS); others are a UserError."""
    for text in overrides or []:
        key, value = _parse_override(text)
        if key not in all_keys() and not any(k.startswith(key + ".") for k in all_keys()):
            raise _unknown_key(key)
        if not is_eval_key(key):
            raise UserError(f"distrain eval does not use config key '{key}' (the model comes from "
                            f"the checkpoint); it takes data.*, " + ", ".join(EVAL_KEYS[1:]))


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config written by ``to_dict`` (e.g. from a checkpoint or a run's config.yaml)."""
    cfg = Config()
    _apply(cfg, data)
    validate(cfg)
    return cfg


def read_run_config(path) -> dict:
    """A run directory's config.yaml (as `dump_config` wrote it) as plain values, for eval/predict.

    Checked: readable UTF-8 YAML (bounded, see yamlio), a mapping whose sections are mappings. Keys
    are not checked against this version's: eval and predict use only the parts they know.
    """
    what = f"run config '{shorten_text(str(path), 200)}'"
    tree = read_yaml_mapping(str(path), what)
    for name in _SECTIONS:
        if name not in tree:
            continue
        if not isinstance(tree[name], yamlio.Section):
            got = shorten(yamlio.plain(tree[name]))
            raise UserError(f"{what}: '{name}' must be a mapping of keys, got {got}; restore the "
                            f"file or remove it (eval then needs data.* overrides)")
    return yamlio.plain(tree)


_SECTIONS = tuple(f.name for f in dataclasses.fields(Config)
                  if dataclasses.is_dataclass(_hints(Config)[f.name]))


def validate(cfg: Config) -> None:
    """Cross-key checks that single-key types and ranges cannot express."""
    if cfg.model.weights_path is not None and cfg.model.pretrained:
        raise UserError("config keys 'model.pretrained' and 'model.weights_path' exclude each "
                        "other; set one")
    from distrain.models import check_model_config

    check_model_config(cfg.model)  # model-specific rules live with the model specs
    if cfg.model.unfreeze_after_epochs is not None and not cfg.model.freeze_features:
        raise UserError("config key 'model.unfreeze_after_epochs' needs model.freeze_features=true")
    if cfg.resume not in ("auto", "none") and not cfg.resume.strip():
        raise UserError("config key 'resume' must be auto, none or a checkpoint path")
    for key, value in (("output_dir", cfg.output_dir), ("data.root", cfg.data.root)):
        if not str(value).strip():
            raise UserError(f"config key '{key}' must not be empty")


def dump_config(cfg: Config, path: Path) -> None:
    """Write the resolved config atomically (a crash leaves the old file or the new one)."""
    atomic_write_text(Path(path), cfg.to_yaml())
