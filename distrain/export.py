"""The exported model: `model.safetensors` (a plain state_dict) and `model.json` (how to use it).

Also finds and loads a model for `eval` and `predict` from a run directory, a checkpoint directory or
an exported file, on the CPU whatever device wrote it. Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from torch import nn

from distrain import __version__
from distrain.errors import UserError
from distrain.models import build_model

MODEL_FILE = "model.safetensors"
MODEL_JSON = "model.json"


def clean_state_dict(sd: dict) -> dict:
    """Strip wrapper prefixes (DDP's `module.`, torch.compile's `_orig_mod.`) and detach to contiguous CPU."""
    out = {}
    for k, v in sd.items():
        while True:
            if k.startswith("module."):
                k = k[len("module."):]
            elif k.startswith("_orig_mod."):
                k = k[len("_orig_mod."):]
            else:
                break
        k = k.replace("._orig_mod.", ".")
        out[k] = v.detach().to("cpu").contiguous()
    return out


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, rename: readers see old or new, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def model_info(cfg, classes: list[str], mean, std) -> dict:
    from distrain.model_specs import preprocessing, spec_for
    from distrain.models import builder_kwargs

    m = cfg.model
    size = m.input_size
    _, _, resize, _ = preprocessing(m, cfg.data.name)
    return {
        "format": "distrain-model/1",
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
    from safetensors.torch import save

    sd = clean_state_dict(state_dict)
    atomic_write_bytes(Path(run_dir) / MODEL_FILE, save(sd, metadata={"architecture": info["architecture"]}))
    atomic_write_bytes(Path(run_dir) / MODEL_JSON, (json.dumps(info, indent=2) + "\n").encode())
    return Path(run_dir) / MODEL_FILE


@dataclass
class LoadedModel:
    model: nn.Module
    info: dict
    source: Path
    config: Optional[dict] = None  # the training run's resolved config, when found


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"'{path}' is not a readable model description: {e}") from None


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"'{path}' is not a valid safetensors file ({e}); re-export or pick another checkpoint") from None


def build_from_state(info: dict, sd: dict, source: Path) -> nn.Module:
    arch, n = info.get("architecture"), info.get("num_classes")
    if not isinstance(arch, str) or not isinstance(n, int):
        raise UserError(f"'{source}': model description lacks 'architecture'/'num_classes'")
    size = info.get("input_size") or [3, None, None]
    model = build_model(arch, num_classes=n, cifar_stem=bool(info.get("cifar_stem", False)),
                        input_size=size[-1])
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise UserError(f"'{source}' does not fit a {arch} with {n} classes: {' '.join(first)}") from None
    return model.eval()


def load_model(path: str) -> LoadedModel:
    """A model from a run directory, a checkpoint directory or an exported `model.safetensors`."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint '{path}' does not exist")
    run_cfg = None
    if p.is_file():
        if p.suffix != ".safetensors":
            raise UserError(f"checkpoint '{path}' is not a .safetensors file, a run directory or a checkpoint directory")
        info_path = p.with_name(MODEL_JSON)
        if not info_path.is_file():
            raise UserError(f"'{info_path}' is missing: it says which architecture '{p.name}' holds")
        info = _read_json(info_path)
        cfg_path = p.parent / "config.yaml"
        run_cfg = _read_yaml(cfg_path) if cfg_path.is_file() else None
        return LoadedModel(build_from_state(info, _load_safetensors(p), p), info, p, run_cfg)
    # A directory: an exported run, else a checkpoint (directory or run with checkpoints/). A checkpoint
    # directory holds a model.safetensors too, but no model.json (its description is in state.json).
    if (p / MODEL_FILE).is_file() and ((p / MODEL_JSON).is_file() or not (p / "state.json").is_file()):
        return load_model(str(p / MODEL_FILE))
    from distrain import checkpoint as ckpt

    loaded = ckpt.load_for_inference(p)
    if loaded is None:
        raise UserError(f"'{path}' holds neither {MODEL_FILE} nor a distrain checkpoint")
    return loaded


def _read_yaml(path: Path) -> Optional[dict]:
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
