"""The checkpoint format: layout, pickle-free encoding, verification, names and pointers.

Layout under ``<output_dir>/checkpoints/``::

    ckpt-000007-step00001234/     one committed checkpoint (the sequence number orders them; it
                                  grows past six digits when it must)
        model.safetensors         plain state_dict, no wrapper prefixes
        optimizer.safetensors     the tensors of the optimizer (and of scheduler/scaler, if any) ...
        state.json                ... and everything else: progress, config, scheduler, scaler,
                                  optimizer structure, world size, global batch, versions, and the
                                  size and SHA-256 of every other file (state.json checks itself too)
        rank-00000.json           per-rank state: RNG states (Python, NumPy, torch CPU/CUDA as
        rank-00000.safetensors    tensors), the rank's running totals, a ZeRO partition if any
    latest                        pointer: the name of the newest good checkpoint
    best                          the name of the checkpoint with the best eval accuracy
    .tmp-*                        an interrupted write or delete; removed at the next start

Invariants:
- Reading needs only safetensors and JSON, so no code can run; every file is checked against the size
  and SHA-256 recorded in state.json before it is used (`verify`).
- A pointer is a bare checkpoint name: it resolves inside its own checkpoints directory or not at all.
- Nothing here writes; the store (checkpoint.py) does, and the resume policy (resume.py) decides.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch

from distrain.errors import UserError

FORMAT = "distrain-checkpoint/1"
POINTER = "latest"
BEST = "best"
STATE = "state.json"
NAME = re.compile(r"^ckpt-(\d{6,})-step(\d+)$")
_REQUIRED = {"format": str, "files": list, "sizes": dict, "sha256": dict, "model_info": dict,
             "world_size": int, "global_batch": int, "train_state": dict, "config": dict,
             "optimizer": (dict, list)}


def checkpoint_name(seq: int, global_step: int) -> str:
    return f"ckpt-{seq:06d}-step{global_step:08d}"


def sequence(path: Path) -> int:
    return int(NAME.match(Path(path).name).group(1))


def rank_files(rank: int) -> tuple[str, str]:
    return f"rank-{rank:05d}.json", f"rank-{rank:05d}.safetensors"


# ----------------------------------------------------------------------------------------------------
# Pickle-free encoding: JSON for structure, safetensors for tensors


def encode(obj: Any, tensors: dict, prefix: str) -> Any:
    """JSON-able structure of ``obj`` with tensors moved into ``tensors`` under unique keys."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}#{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: encode(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}}
        return {"__items__": [[encode(k, tensors, prefix), encode(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [encode(v, tensors, prefix) for v in obj]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def decode(obj: Any, tensors: dict) -> Any:
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: decode(v, tensors) for k, v in obj["__dict__"].items()}
        if "__items__" in obj:
            return {decode(k, tensors): decode(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(decode(v, tensors) for v in obj["__tuple__"])
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        raise ValueError(f"unknown record {sorted(obj)[:3]}")
    return obj


def tensor_bytes(tensors: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def parse_tensors(data: bytes, source: Path) -> dict:
    """Tensors from safetensors bytes (no pickle involved); UserError naming ``source`` if they do not parse."""
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as e:  # noqa: BLE001 - SafetensorError, ValueError, ...: any parse failure is damage
        raise UserError(f"checkpoint file '{source}' is damaged ({type(e).__name__}: {e})") from None


def read_tensors(path: Path) -> dict:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read checkpoint file '{path}': {e.strerror or e}") from None
    return parse_tensors(data, path)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def meta_digest(meta: dict) -> str:
    """SHA-256 of state.json's content without its own digest (canonical JSON: sorted keys)."""
    body = {k: v for k, v in meta.items() if k != "digest"}
    return sha256(json.dumps(body, sort_keys=True).encode())



# ----------------------------------------------------------------------------------------------------
# RNG


def rng_state() -> tuple[dict, dict]:
    tensors: dict = {}
    state = {
        "python": encode(random.getstate(), tensors, "python"),
        "numpy": encode(np.random.get_state(), tensors, "numpy"),
        "torch": encode(torch.get_rng_state(), tensors, "torch"),
        "cuda": encode(torch.cuda.get_rng_state_all(), tensors, "cuda") if torch.cuda.is_available() else None,
    }
    return state, tensors


def set_rng_state(state: dict, tensors: dict) -> None:
    random.setstate(_as_python_state(decode(state["python"], tensors)))
    np.random.set_state(decode(state["numpy"], tensors))
    torch.set_rng_state(decode(state["torch"], tensors))
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = decode(state["cuda"], tensors)
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _as_python_state(s):
    version, internal, gauss = s
    return version, tuple(internal), gauss


# ----------------------------------------------------------------------------------------------------
# Finding and checking checkpoints


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Committed checkpoints, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if NAME.match(p.name) and p.is_dir()]
    return sorted(found, key=sequence)


def read_meta(path: Path) -> dict:
    """state.json of a checkpoint, checked against its own digest; UserError naming the file when it is missing or damaged."""
    f = Path(path) / STATE
    try:
        meta = json.loads(f.read_bytes())
    except FileNotFoundError:
        raise UserError(f"checkpoint '{path}' has no {STATE}; it is not a distrain checkpoint or it is incomplete") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"checkpoint file '{f}' is damaged ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"checkpoint file '{f}' is not a {FORMAT} record")
    if meta.get("digest") != meta_digest(meta):
        raise UserError(f"checkpoint file '{f}' is damaged (its checksum does not match its content)")
    for key, typ in _REQUIRED.items():
        if not isinstance(meta.get(key), typ):
            raise UserError(f"checkpoint file '{f}' is damaged (no valid '{key}')")
    return meta


def verify(path: Path, names: Optional[Iterable[str]] = None) -> dict:
    """Check every file of a checkpoint (or only ``names``) against the size and SHA-256 in state.json; returns the meta."""
    meta = read_meta(path)
    wanted = meta["files"] if names is None else list(names)
    for name in wanted:
        f = Path(path) / name
        if name not in meta["files"] or not f.is_file():
            raise UserError(f"checkpoint file '{f}' is missing")
        size = f.stat().st_size
        if size != meta["sizes"].get(name):
            raise UserError(f"checkpoint file '{f}' is truncated or damaged ({size} bytes, {meta['sizes'].get(name)} written)")
        try:
            data = f.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read checkpoint file '{f}': {e.strerror or e}") from None
        if sha256(data) != meta["sha256"].get(name):
            raise UserError(f"checkpoint file '{f}' is damaged (its SHA-256 does not match the one in {STATE})")
        _check_format(f, data)
    return meta


def _check_format(f: Path, data: bytes) -> None:
    """The file parses as what its name says (cheap: a safetensors header, or JSON), whatever its checksum says."""
    try:
        if f.suffix == ".safetensors":
            (n,) = np.frombuffer(data[:8], dtype="<u8") if len(data) >= 8 else (None,)
            if n is None or not 2 <= n <= len(data) - 8:
                raise ValueError("no safetensors header")
            header = json.loads(data[8 : 8 + int(n)])
            if not isinstance(header, dict):
                raise ValueError("safetensors header is not a JSON object")
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + int(n) + end != len(data):
                raise ValueError("safetensors header does not describe the file")
        else:
            json.loads(data)
    except Exception as e:  # noqa: BLE001 - any parse failure means a damaged file
        raise UserError(f"checkpoint file '{f}' is damaged ({type(e).__name__}: {e})") from None


def read_pointer(ckpt_dir: Path, name: str = POINTER) -> Optional[Path]:
    """The checkpoint a pointer names, only if it is a bare checkpoint name of a real directory inside
    ``ckpt_dir``: a pointer edited to lead elsewhere (``../other-run/...``, an absolute path, a
    symlink out) is ignored, so eval, predict and train always agree on what a run directory holds."""
    try:
        text = (Path(ckpt_dir) / name).read_text(errors="replace").strip()
    except OSError:
        return None
    if not NAME.match(text):
        return None
    target = Path(ckpt_dir) / text
    if target.is_symlink() or not target.is_dir():
        return None
    return target


def resolve_checkpoint_dir(path: Path) -> Optional[Path]:
    """A checkpoint directory from a checkpoint, a checkpoints/ folder or a run directory."""
    path = Path(path)
    if (path / STATE).is_file() or (NAME.match(path.name) and path.is_dir()):
        return path  # a checkpoint (read_meta says what is wrong with it, if anything)
    for d in (path, path / "checkpoints"):
        target = read_pointer(d)
        if target is not None:
            return target
        found = list_checkpoints(d)
        if found:
            return found[-1]
    return None
