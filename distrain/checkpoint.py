"""Resumable checkpoints: atomic, pickle-free, retained by recency and accuracy.

Layout under ``<output_dir>/checkpoints/``::

    ckpt-000007-step00001234/     one committed checkpoint (the sequence number orders them)
        model.safetensors         plain state_dict, no wrapper prefixes
        optimizer.safetensors     the optimizer's tensors ...
        state.json                ... and everything else: progress, config, scheduler, scaler,
                                  optimizer structure, world size, global batch, versions
        rank-00000.json           per-rank state: RNG states (Python, NumPy, torch CPU/CUDA as
        rank-00000.safetensors    tensors) and the rank's running totals of the current epoch
    latest                        pointer: the name of the newest good checkpoint
    .tmp-*                        an interrupted write; removed at the next start

A save is a collective: every rank hands its per-rank state to rank 0, which writes everything into a
temporary directory, fsyncs it, renames it into place (the commit), then moves the pointer the same
way and only then deletes checkpoints that fell out of retention. A kill -9 at any instant leaves the
previous good checkpoint loadable. Loading reads only safetensors and JSON, so no code can run.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from distrain import __version__
from distrain.errors import UserError
from distrain.export import atomic_write_bytes, clean_state_dict

if TYPE_CHECKING:  # pragma: no cover
    from distrain.engine import Trainer

FORMAT = "distrain-checkpoint/1"
POINTER = "latest"
_NAME = re.compile(r"^ckpt-(\d{6})-step(\d+)$")
_PER_RANK_FIELDS = ("epoch_loss_sum", "epoch_correct", "epoch_samples")


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
    if isinstance(obj, (np.integer, np.floating)):
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


def _tensor_bytes(tensors: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def _read_tensors(path: Path) -> dict:
    from safetensors.torch import load

    return load(Path(path).read_bytes())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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
# Finding checkpoints


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Committed checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def read_meta(path: Path) -> dict:
    """state.json of a checkpoint; UserError naming the file when it is missing or damaged."""
    f = Path(path) / "state.json"
    try:
        meta = json.loads(f.read_text())
    except FileNotFoundError:
        raise UserError(f"checkpoint '{path}' has no state.json; it is not a distrain checkpoint or it is incomplete") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint file '{f}' is damaged ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"checkpoint file '{f}' is not a {FORMAT} record")
    return meta


def verify(path: Path) -> dict:
    """Parse every file of a checkpoint (catches truncation and corruption); returns its meta."""
    meta = read_meta(path)
    for name in meta.get("files", []):
        f = Path(path) / name
        if not f.is_file():
            raise UserError(f"checkpoint file '{f}' is missing")
        if f.stat().st_size != meta["sizes"][name]:
            raise UserError(f"checkpoint file '{f}' is truncated ({f.stat().st_size} of {meta['sizes'][name]} bytes)")
        try:
            if name.endswith(".safetensors"):
                _read_tensors(f)
            else:
                json.loads(f.read_text())
        except Exception as e:  # noqa: BLE001 - any parse failure means a damaged file
            raise UserError(f"checkpoint file '{f}' is damaged ({type(e).__name__}: {e})") from None
    return meta


def resolve_checkpoint_dir(path: Path) -> Optional[Path]:
    """A checkpoint directory from a checkpoint, a checkpoints/ folder or a run directory."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    for d in (path, path / "checkpoints"):
        pointer = d / POINTER
        if pointer.is_file():
            target = d / pointer.read_text().strip()
            if target.is_dir():
                return target
        found = list_checkpoints(d)
        if found:
            return found[-1]
    return None


def load_for_inference(path: Path):
    """A LoadedModel (see export.py) from a checkpoint directory or a run directory's newest checkpoint."""
    from distrain.export import LoadedModel, build_from_state

    d = resolve_checkpoint_dir(path)
    if d is None:
        return None
    meta = verify(d)
    cfg = meta["config"]
    info = meta["model_info"]
    model = build_from_state(info, _read_tensors(d / "model.safetensors"), d / "model.safetensors")
    return LoadedModel(model, info, d, cfg)


# ----------------------------------------------------------------------------------------------------
# The manager the engine talks to


class CheckpointManager:
    def __init__(self, ckpt_dir: Path, trainer: "Trainer"):
        self.dir = Path(ckpt_dir)
        self.t = trainer

    # -- start ----------------------------------------------------------------------------------
    def clean_temporaries(self) -> None:
        """Remove what an interrupted save left behind (main process, before anything else)."""
        if not self.dir.is_dir():
            return
        for p in self.dir.iterdir():
            if p.name.startswith(".tmp-") or p.name.startswith(f".{POINTER}."):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def find_resume(self) -> Optional[Path]:
        """The checkpoint to resume from, per the `resume` key, checked for damage (same answer on every rank)."""
        r = self.t.cfg.resume
        if r == "none":
            return None
        if r != "auto":
            d = resolve_checkpoint_dir(Path(r))
            if d is None:
                raise UserError(f"config key 'resume': no distrain checkpoint at '{r}'")
            verify(d)
            self.check_compatible(read_meta(d), d)
            return d
        # Newest committed first: the rename is the commit, so a checkpoint newer than the pointer (a kill
        # between the two renames) is complete and preferred.
        candidates = list_checkpoints(self.dir)[::-1]
        for d in candidates:
            try:
                meta = verify(d)
            except UserError as e:
                self.t.log(f"warning: skipping damaged checkpoint {d}: {e}")
                continue
            self.check_compatible(meta, d)
            return d
        return None

    def check_compatible(self, meta: dict, path: Path) -> None:
        cfg = self.t.cfg
        info = meta["model_info"]
        if info["architecture"] != cfg.model.name or info["num_classes"] != cfg.model.num_classes:
            raise UserError(
                f"checkpoint '{path}' holds a {info['architecture']} with {info['num_classes']} classes but the config asks "
                f"for {cfg.model.name} with {cfg.model.num_classes}; use another output_dir or resume=none"
            )
        if meta["global_batch"] != self.t.global_batch:
            if not cfg.train.allow_batch_change:
                raise UserError(
                    f"checkpoint '{path}' was trained with global batch {meta['global_batch']} "
                    f"({meta['world_size']} processes) but this run has {self.t.global_batch}; resuming would change the "
                    f"data order and schedule. Keep batch_size x processes x grad_accum_steps, or set train.allow_batch_change=true"
                )
            self.t.log(f"warning: global batch changes from {meta['global_batch']} to {self.t.global_batch} (allowed by train.allow_batch_change)")
        elif meta["world_size"] != self.t.world:
            self.t.log(f"warning: resuming a {meta['world_size']}-process checkpoint on {self.t.world} processes with the same "
                       f"global batch {self.t.global_batch}; per-rank random states are re-derived")

    # -- save -----------------------------------------------------------------------------------
    def save(self, reason: str, accuracy: Optional[float] = None) -> None:
        """Collective: every rank calls it at the same step."""
        t = self.t
        state, tensors = rng_state()
        per_rank = {"rng": state, "progress": {k: getattr(t.state, k) for k in _PER_RANK_FIELDS}}
        payload = (per_rank, tensors)
        if t.world > 1:
            from accelerate.utils import gather_object

            payloads = gather_object([payload])
        else:
            payloads = [payload]
        started = time.time()
        path = t._agree("save a checkpoint", lambda: self._write(reason, accuracy, payloads), main_only=True)
        if t.is_main:
            t.metrics.log("checkpoint", step=t.state.global_step, reason=reason, path=str(path),
                          seconds=round(time.time() - started, 3))

    def _write(self, reason: str, accuracy: Optional[float], payloads: list) -> Path:
        t = self.t
        acc = t.accelerator
        seq = 1 + max((int(_NAME.match(p.name).group(1)) for p in list_checkpoints(self.dir)), default=0)
        name = f"ckpt-{seq:06d}-step{t.state.global_step:08d}"
        tmp = self.dir / f".tmp-{name}-{os.getpid()}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            files: dict[str, bytes] = {}
            model_sd = clean_state_dict(acc.get_state_dict(t.model, unwrap=True))
            files["model.safetensors"] = _tensor_bytes(model_sd)
            opt_tensors: dict = {}
            opt_struct = encode(t.optimizer.state_dict(), opt_tensors, "opt")
            files["optimizer.safetensors"] = _tensor_bytes(opt_tensors)
            for r, (per_rank, rtensors) in enumerate(payloads):
                files[f"rank-{r:05d}.json"] = json.dumps(per_rank).encode()
                files[f"rank-{r:05d}.safetensors"] = _tensor_bytes(rtensors)
            for fname, data in files.items():
                _write(tmp / fname, data)
            from distrain.data.pipeline import normalization
            from distrain.export import model_info

            mean, std = normalization(t.cfg)
            meta = {
                "format": FORMAT,
                "reason": reason,
                "accuracy": accuracy,
                "train_state": {k: v for k, v in asdict(t.state).items() if k not in _PER_RANK_FIELDS},
                "config": t.cfg.to_dict(),
                "model_info": model_info(t.cfg, t.train_split.classes, mean, std),
                "world_size": t.world,
                "global_batch": t.global_batch,
                "optimizer": opt_struct,
                "scheduler": encode(t.scheduler.state_dict(), {}, "sched"),
                "scaler": encode(acc.scaler.state_dict(), {}, "scaler") if acc.scaler is not None else None,
                "versions": {"distrain": __version__, "torch": torch.__version__, "python": sys.version.split()[0]},
                "files": sorted(files),
                "sizes": {k: len(v) for k, v in files.items()},
                "time": time.time(),
            }
            _write(tmp / "state.json", json.dumps(meta).encode())
            _fsync_dir(tmp)
            final = self.dir / name
            os.rename(tmp, final)  # the commit
            _fsync_dir(self.dir)
            atomic_write_bytes(self.dir / POINTER, name.encode())
            _fsync_dir(self.dir)
        except (OSError, RuntimeError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            why = getattr(e, "strerror", None) or str(e).splitlines()[0]
            raise UserError(f"cannot write a checkpoint in '{self.dir}': {why}. Free space or fix permissions; "
                            f"earlier checkpoints are intact") from None
        self._retain()
        return final

    def _retain(self) -> None:
        """Keep the newest `keep_last` and the best by eval accuracy; delete only committed, unneeded ones."""
        cfg = self.t.cfg.checkpoint
        found = list_checkpoints(self.dir)
        keep = set(found[-cfg.keep_last:])
        if cfg.keep_best:
            best, best_acc = None, None
            for p in found:
                try:
                    a = read_meta(p).get("accuracy")
                except UserError:
                    continue
                if a is not None and (best_acc is None or a > best_acc):
                    best, best_acc = p, a
            if best is not None:
                keep.add(best)
                try:
                    atomic_write_bytes(self.dir / "best", best.name.encode())
                except OSError:
                    pass
        for p in found:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)

    # -- load -----------------------------------------------------------------------------------
    def load(self, path: Path):
        """Restore model, optimizer, scheduler, scaler, progress and this rank's RNG from ``path``."""
        from distrain.engine import TrainState

        t = self.t
        meta = read_meta(path)
        model = t.accelerator.unwrap_model(t.model)
        sd = _read_tensors(path / "model.safetensors")
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise UserError(f"checkpoint '{path}' does not fit the model: {str(e).splitlines()[0]}") from None
        opt = decode(meta["optimizer"], _read_tensors(path / "optimizer.safetensors"))
        try:
            t.optimizer.load_state_dict(opt)
        except (ValueError, KeyError) as e:
            raise UserError(f"checkpoint '{path}': optimizer state does not fit this config ({e}); "
                            "the optimizer or frozen layers changed") from None
        sched = decode(meta["scheduler"], {})
        t.scheduler.load_state_dict(sched)
        if meta.get("scaler") is not None and t.accelerator.scaler is not None:
            t.accelerator.scaler.load_state_dict(decode(meta["scaler"], {}))
        state = TrainState(**meta["train_state"])
        rank_json = path / f"rank-{t.rank:05d}.json"
        if meta["world_size"] == t.world and rank_json.is_file():
            per_rank = json.loads(rank_json.read_text())
            set_rng_state(per_rank["rng"], _read_tensors(path / f"rank-{t.rank:05d}.safetensors"))
            for k, v in per_rank["progress"].items():
                setattr(state, k, v)
        else:
            from distrain.data.sampling import derived_seed

            seed = derived_seed(t.cfg.train.seed, t.rank, state.global_step)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
        return state
