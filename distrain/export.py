"""The exported model: `model.safetensors` (a plain state_dict) and `model.json` (how to use it).

Also finds and loads a model for `eval` and `predict` from a run directory, a checkpoint directory
or an exported file, on the CPU whatever device wrote it. Nothing here unpickles anything.

Invariants:
- The pair is verifiable: each file is written atomically (`distrain.fsio`, the umask's modes), the
  weights first, then model.json, which records the weights' size and SHA-256 (``"weights"``). A
  kill between the two leaves weights that model.json does not describe (or no model.json).
- A pair found incomplete or inconsistent (model.json missing or unreadable, weights damaged or not
  the recorded ones) is not used: the loader falls back to the run's newest checkpoint
  (`load_for_inference`) with a warning on stderr, or raises a UserError if it has none.
  A model.json without ``"weights"`` (written before the record existed) is trusted as it is.
- Every field read from a model description (model.json, or a checkpoint's state.json) is checked
  (`check_model_info`), and weights holding NaN or infinity are refused: UserErrors naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from distrain import __version__
from distrain import ckpt_format as fmt
from distrain.config import read_run_config
from distrain.errors import UserError
from distrain.fsio import TEMP_PREFIX, atomic_write_bytes, clean_temporaries
from distrain.images import eval_resize
from distrain.models import build_model
from distrain.state_dicts import clean_state_dict

__all__ = ["MODEL_FILE", "MODEL_JSON", "LoadedModel", "build_from_state",
           "check_model_info", "clean_export_temporaries", "export_model", "load_for_inference",
           "load_model", "model_info"]

MODEL_FILE = "model.safetensors"
MODEL_JSON = "model.json"
FORMAT = "distrain-model/1"
MAX_CLASSES = 100_000
INPUT_SIZES = (8, 1024)  # the range of model.input_size


class IncompleteExport(UserError):
    """The export pair cannot be used as it is (a checkpoint of the run may stand in for it)."""


def model_info(cfg, classes: list[str], mean, std) -> dict:
    from distrain.model_specs import preprocessing, spec_for
    from distrain.models import builder_kwargs

    m = cfg.model
    size = m.input_size
    _, _, resize, _ = preprocessing(m, cfg.data.name)
    return {
        "format": FORMAT,
        "architecture": m.name,
        "num_classes": m.num_classes,
        "classes": list(classes),
        "input_size": [3, size, size],
        # Photos for predict: resize the shorter side to `resize`, centre-crop `input_size`.
        "resize": resize,
        "mean": list(mean),
        "std": list(std),
        "dataset": cfg.data.name,
        # How to rebuild it: torchvision.models.get_model(architecture, num_classes=...,
        # **builder_kwargs) takes model.safetensors strictly, unless cifar_stem (then
        # distrain.models.build_model(architecture, ..., cifar_stem=True) does).
        "cifar_stem": bool(m.cifar_stem),
        "builder_kwargs": builder_kwargs(spec_for(m.name), size),
        "distrain_version": __version__,
    }


def export_model(run_dir: Path, state_dict: dict, info: dict) -> Path:
    """Write the pair: the weights, then model.json recording their size and SHA-256."""
    from safetensors.torch import save

    run_dir = Path(run_dir)
    data = save(clean_state_dict(state_dict), metadata={"architecture": info["architecture"]})
    atomic_write_bytes(run_dir / MODEL_FILE, data)
    record = {"file": MODEL_FILE, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    atomic_write_bytes(run_dir / MODEL_JSON, (json.dumps({**info, "weights": record}, indent=2)
                                              + "\n").encode())
    return run_dir / MODEL_FILE


def clean_export_temporaries(run_dir: Path) -> list[Path]:
    """Remove what killed exports left in ``run_dir`` (call with the run lock held); the removed."""
    prefixes = [f"{TEMP_PREFIX}{name}." for name in (MODEL_FILE, MODEL_JSON)]
    prefixes += [f".{name}." for name in (MODEL_FILE, MODEL_JSON)]  # older versions' temp names
    return clean_temporaries(Path(run_dir), prefixes)


@dataclass
class LoadedModel:
    model: nn.Module
    info: dict
    source: Path
    config: Optional[dict] = None  # the training run's resolved config, when found


def _fail(where: Path, key: str, what: str) -> UserError:
    return UserError(f"'{where}': model description field '{key}' {what}; re-export the model "
                     f"or pick a checkpoint")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite_triple(v) -> bool:
    return (isinstance(v, list) and len(v) == 3
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                    for x in v))


def check_model_info(info, where: Path) -> dict:
    """``info`` if every field eval and predict read is sane; else a UserError naming the field."""
    if not isinstance(info, dict):
        raise UserError(f"'{where}': the model description is not a JSON object")
    if info.get("format") != FORMAT:
        raise _fail(where, "format", f"must be '{FORMAT}'")
    if not isinstance(info.get("architecture"), str):
        raise _fail(where, "architecture", "must be a model name")
    n = info.get("num_classes")
    if not _is_int(n) or not 2 <= n <= MAX_CLASSES:
        raise _fail(where, "num_classes", f"must be a whole number from 2 to {MAX_CLASSES}")
    # A list of another length is allowed (cifar10 data under model.num_classes=12 has 10 names):
    # predict then reports class indices.
    classes = info.get("classes")
    if classes is not None and (not isinstance(classes, list) or len(classes) > MAX_CLASSES
                                or not all(isinstance(c, str) for c in classes)):
        raise _fail(where, "classes", "must be a list of class names")
    size = info.get("input_size")
    lo, hi = INPUT_SIZES
    if (not isinstance(size, list) or len(size) != 3 or not all(_is_int(s) for s in size)
            or size[0] != 3 or size[1] != size[2] or not lo <= size[2] <= hi):
        raise _fail(where, "input_size", f"must be [3, S, S] with S from {lo} to {hi}")
    resize = info.get("resize", size[2])
    if not _is_int(resize) or not size[2] <= resize <= 4 * size[2]:
        raise _fail(where, "resize", f"must be a whole number from the input size {size[2]} to "
                                     f"{4 * size[2]}")
    for key in ("mean", "std"):
        if not _finite_triple(info.get(key)):
            raise _fail(where, key, "must be a list of 3 finite numbers")
    if not all(s > 0 for s in info["std"]):
        raise _fail(where, "std", "must be positive")
    if not isinstance(info.get("dataset", ""), str):
        raise _fail(where, "dataset", "must be a dataset name")
    return info


def _describer(source: Path) -> Path:
    """The file describing the weights ``source``: model.json, or a checkpoint's state.json."""
    if source.name == MODEL_FILE and not (source.parent / MODEL_JSON).is_file():
        state = source.parent / "state.json"
        if state.is_file():
            return state
    return source.with_name(MODEL_JSON)


def build_from_state(info: dict, sd: dict, source: Path) -> nn.Module:
    check_model_info(info, _describer(Path(source)))
    for name, t in sd.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"'{source}' holds non-finite weights (the run diverged?): '{name}' "
                            f"has NaN or infinite values; pick an earlier checkpoint")
    arch, n = info["architecture"], info["num_classes"]
    size = info.get("input_size") or [3, None, None]
    model = build_model(arch, num_classes=n, cifar_stem=bool(info.get("cifar_stem", False)),
                        input_size=size[-1])
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise UserError(f"'{source}' does not fit a {arch} with {n} classes: "
                        f"{' '.join(first)}") from None
    return model.eval()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_bytes())
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise IncompleteExport(f"'{path}' is not a readable model description: {e}") from None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_recorded(weights: Path, info: dict, info_path: Path) -> None:
    """The weights are the ones model.json recorded (no record: an older export, trusted)."""
    record = info.get("weights")
    if record is None:
        return
    if (not isinstance(record, dict) or not _is_int(record.get("size"))
            or not isinstance(record.get("sha256"), str)):
        raise _fail(info_path, "weights", "must hold the weights' size and sha256")
    if weights.stat().st_size != record["size"] or _sha256_file(weights) != record["sha256"]:
        raise IncompleteExport(f"'{weights}' is not the file '{info_path}' describes (its size or "
                               f"SHA-256 differs: an interrupted export?); re-export or pick a "
                               f"checkpoint")


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise IncompleteExport(f"'{path}' is not a valid safetensors file ({e}); re-export or pick "
                               f"another checkpoint") from None


def _load_export(weights: Path) -> LoadedModel:
    """The exported pair around ``weights``, or the run's newest checkpoint if it is unusable."""
    info_path = weights.with_name(MODEL_JSON)
    try:
        if not info_path.is_file():
            raise IncompleteExport(f"'{info_path}' is missing: it says which architecture "
                                   f"'{weights.name}' holds")
        info = _read_json(info_path)
        sd = _load_safetensors(weights)
        if isinstance(info, dict):
            _check_recorded(weights, info, info_path)
    except IncompleteExport as e:
        fallback = load_for_inference(weights.parent)
        if fallback is None:
            raise
        print(f"warning: {e}; using the run's checkpoint '{fallback.source}' instead",
              file=sys.stderr, flush=True)
        return fallback
    model = build_from_state(info, sd, weights)
    cfg_path = weights.parent / "config.yaml"
    return LoadedModel(model, info, weights, read_run_config(cfg_path) if cfg_path.is_file() else None)


def load_model(path: str) -> LoadedModel:
    """A model from a run directory, a checkpoint directory or an exported `model.safetensors`."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint '{path}' does not exist")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise UserError(f"checkpoint '{path}' is not a .safetensors file, a run directory or a "
                            f"checkpoint directory")
        if not p.with_name(MODEL_JSON).is_file() and (p.parent / "state.json").is_file():
            return load_model(str(p.parent))  # a checkpoint's weights: state.json describes them
        return _load_export(p)
    # A directory: an exported run, else a checkpoint (directory or run with checkpoints/). A
    # checkpoint directory holds a model.safetensors too, but no model.json (its state.json says)
    exported = (p / MODEL_JSON).is_file() or not (p / "state.json").is_file()
    if (p / MODEL_FILE).is_file() and exported:
        return _load_export(p / MODEL_FILE)
    loaded = load_for_inference(p)
    if loaded is None:
        raise UserError(f"'{path}' holds neither {MODEL_FILE} nor a distrain checkpoint")
    return loaded


def load_for_inference(path: Path) -> Optional[LoadedModel]:
    """A model from a checkpoint directory or a run directory's newest checkpoint (only its model
    file is verified: the optimizer is not needed here); None if there is none."""
    d = fmt.resolve_checkpoint_dir(path)
    if d is None:
        return None
    meta = fmt.verify(d, names=["model.safetensors"])
    info = meta["model_info"]
    model = build_from_state(info, fmt.read_tensors(d / "model.safetensors"), d / "model.safetensors")
    return LoadedModel(model, info, d, meta["config"])
