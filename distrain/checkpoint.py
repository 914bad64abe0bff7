"""Resumable checkpoints: atomic, pickle-free, checksummed, retained by recency and accuracy.

Layout under ``<output_dir>/checkpoints/``::

    ckpt-000007-step00001234/     one committed checkpoint (the sequence number orders them)
        model.safetensors         plain state_dict, no wrapper prefixes
        optimizer.safetensors     the tensors of the optimizer (and of scheduler/scaler, if any) ...
        state.json                ... and everything else: progress, config, scheduler, scaler,
                                  optimizer structure, world size, global batch, versions, and the
                                  size and SHA-256 of every other file (state.json checks itself too)
        rank-00000.json           per-rank state: RNG states (Python, NumPy, torch CPU/CUDA as
        rank-00000.safetensors    tensors) and the rank's running totals of the current epoch
    latest                        pointer: the name of the newest good checkpoint
    best                          the name of the checkpoint with the best eval accuracy
    .tmp-*                        an interrupted write or delete; removed at the next start

A save is a collective: every rank hands its per-rank state to rank 0, which writes everything into a
temporary directory, fsyncs it, renames it into place (the commit), then moves the pointer the same
way and only then deletes checkpoints that fell out of retention (rename out of the namespace first, so
a kill in the middle never leaves a half-deleted checkpoint under a valid name). A kill -9 at any instant
leaves the previous good checkpoint loadable. An I/O failure (disk full, unwritable directory) is a
UserError on every rank and leaves the committed checkpoints as they were.

Loading reads only safetensors and JSON, so no code can run; every file is checked against the size and
SHA-256 recorded in state.json before it is used, so a truncated or corrupted checkpoint is skipped
(``resume=auto``, with a warning naming the file) or refused (``resume=<path>``, exit 2). The
architecture, class count and global batch are checked before any tensor is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

import numpy as np
import torch

from distrain import __version__, resume_policy
from distrain.errors import UserError
from distrain.export import atomic_write_bytes, clean_state_dict
from distrain.optim import apply_optimizer_hparams

if TYPE_CHECKING:  # pragma: no cover
    from distrain.engine import Trainer

FORMAT = "distrain-checkpoint/1"
POINTER = "latest"
BEST = "best"
STATE = "state.json"
_NAME = re.compile(r"^ckpt-(\d{6})-step(\d+)$")
_PER_RANK_FIELDS = ("epoch_loss_sum", "epoch_correct", "epoch_samples")
# What an interrupted save, pointer update or delete leaves behind.
_TEMP_PREFIXES = (".tmp-", f".{POINTER}.", f".{BEST}.")
_REQUIRED = {"format": str, "files": list, "sizes": dict, "sha256": dict, "model_info": dict, "world_size": int,
             "global_batch": int, "train_state": dict, "config": dict, "optimizer": (dict, list)}


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


def _tensor_bytes(tensors: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def _parse_tensors(data: bytes, source: Path) -> dict:
    """Tensors from safetensors bytes (no pickle involved); UserError naming ``source`` if they do not parse."""
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as e:  # noqa: BLE001 - SafetensorError, ValueError, ...: any parse failure is damage
        raise UserError(f"checkpoint file '{source}' is damaged ({type(e).__name__}: {e})") from None


def _read_tensors(path: Path) -> dict:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read checkpoint file '{path}': {e.strerror or e}") from None
    return _parse_tensors(data, path)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _meta_digest(meta: dict) -> str:
    """SHA-256 of state.json's content without its own digest (canonical JSON: sorted keys)."""
    body = {k: v for k, v in meta.items() if k != "digest"}
    return _sha256(json.dumps(body, sort_keys=True).encode())


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
# DeepSpeed ZeRO (accelerate launch --config_file launch/deepspeed_zero2.yaml)
#
# ZeRO partitions the optimizer state across ranks, and its own state_dict() holds Python objects (loss
# scaler, slice mappings) that a pickle-free checkpoint cannot store. Each rank's partition goes into its
# rank-NNNNN files instead (so a resume needs the same number of processes): the state of the torch
# optimizer over the rank's flat fp32 partition, the fp32 master partition itself when the model is 16-bit,
# and the loss scale. model.safetensors stays the plain full state_dict.

ZERO_MARKER = {"deepspeed_zero": "per-rank"}  # what optimizer.safetensors/state.json hold instead


def zero_state(t) -> dict:
    zo = t.optimizer.optimizer  # Accelerate's DeepSpeedOptimizerWrapper -> DeepSpeedZeroOptimizer
    state = {"base": zo.optimizer.state_dict(),
             "loss_scaler": {k: v for k, v in vars(zo.loss_scaler).items() if type(v) in (bool, int, float)}}
    if t.rt.precision != "no":  # fp32 model weights are the master weights; 16-bit ones are not
        state["fp32"] = [p.detach() for p in zo.single_partition_of_fp32_groups]
    return state


@torch.no_grad()
def load_zero_state(t, state: dict) -> None:
    """After the model weights are loaded: this rank's optimizer partition, master weights and loss scale."""
    zo = t.optimizer.optimizer
    zo.optimizer.load_state_dict(state["base"])
    if "fp32" in state:
        for dst, src in zip(zo.single_partition_of_fp32_groups, state["fp32"], strict=True):
            dst.copy_(src)
    else:
        zo.refresh_fp32_params()  # master partition from the (fp32) weights just loaded
    for k, v in state["loss_scaler"].items():
        setattr(zo.loss_scaler, k, v)


# ----------------------------------------------------------------------------------------------------
# Finding and checking checkpoints


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Committed checkpoints, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if _NAME.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


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
    if meta.get("digest") != _meta_digest(meta):
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
        if _sha256(data) != meta["sha256"].get(name):
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


def resolve_checkpoint_dir(path: Path) -> Optional[Path]:
    """A checkpoint directory from a checkpoint, a checkpoints/ folder or a run directory."""
    path = Path(path)
    if (path / STATE).is_file() or (_NAME.match(path.name) and path.is_dir()):
        return path  # a checkpoint (read_meta says what is wrong with it, if anything)
    for d in (path, path / "checkpoints"):
        pointer = d / POINTER
        if pointer.is_file():
            try:
                target = d / pointer.read_text(errors="replace").strip()
            except OSError:
                target = None
            if target is not None and _NAME.match(target.name) and target.is_dir():
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
    meta = verify(d, names=["model.safetensors"])  # the optimizer is not needed here
    info = meta["model_info"]
    model = build_from_state(info, _read_tensors(d / "model.safetensors"), d / "model.safetensors")
    return LoadedModel(model, info, d, meta["config"])


def trim_traces(run_dir: Path, epoch: int, step_in_epoch: int, grad_accum_steps: int) -> None:
    """Make ``log.trace_samples`` files agree with a resume point (epoch, step_in_epoch).

    A killed run may have written traces past its last checkpoint; the resumed run writes
    ``train-epoch{E}-from{S}-rank{R}.json`` for what it redoes, so earlier files of that epoch keep only the
    micro-batches before S, and files of later work are removed: each image then appears exactly once per epoch.
    """
    d = Path(run_dir) / "trace"
    if not d.is_dir():
        return
    pat_train = re.compile(r"^train-epoch(\d+)-from(\d+)-rank(\d+)\.json$")
    pat_eval = re.compile(r"^eval-epoch(\d+)-rank(\d+)\.json$")
    for f in d.iterdir():
        m = pat_train.match(f.name)
        if m:
            e, start = int(m.group(1)), int(m.group(2))
            if e > epoch or (e == epoch and start >= step_in_epoch):
                f.unlink(missing_ok=True)
            elif e == epoch:
                try:
                    micro = json.loads(f.read_text())
                except (OSError, ValueError):
                    continue
                keep = (step_in_epoch - start) * grad_accum_steps
                if len(micro) > keep:
                    atomic_write_bytes(f, json.dumps(micro[:keep]).encode())
            continue
        m = pat_eval.match(f.name)
        if m and int(m.group(1)) >= epoch:
            f.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------
# The manager the engine talks to


class CheckpointManager:
    def __init__(self, ckpt_dir: Path, trainer: "Trainer"):
        self.dir = Path(ckpt_dir)
        self.t = trainer

    # -- start ----------------------------------------------------------------------------------
    def clean_temporaries(self) -> None:
        """Remove what an interrupted save or delete left behind (main process, before anything else)."""
        if not self.dir.is_dir():
            return
        for p in self.dir.iterdir():
            if p.name.startswith(_TEMP_PREFIXES):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    def find_resume(self) -> Optional[Path]:
        """The checkpoint to resume from, per the `resume` key, checked for damage (same answer on every rank).

        Compatibility (architecture, classes, global batch) is decided from state.json alone, before any
        tensor file is read.
        """
        r = self.t.cfg.resume
        if r == "none":
            return None
        if r != "auto":
            d = resolve_checkpoint_dir(Path(r))
            if d is None:
                raise UserError(f"config key 'resume': no distrain checkpoint at '{r}'")
            self.check_compatible(read_meta(d), d)
            verify(d)
            return d
        # Newest committed first: the rename is the commit, so a checkpoint newer than the pointer (a kill
        # between the two renames) is complete and preferred.
        for d in list_checkpoints(self.dir)[::-1]:
            try:
                meta = read_meta(d)
            except UserError as e:
                self.t.log(f"warning: skipping damaged checkpoint {d}: {e}")
                continue
            self.check_compatible(meta, d)
            try:
                verify(d)
            except UserError as e:
                self.t.log(f"warning: skipping damaged checkpoint {d}: {e}")
                continue
            return d
        return None

    def check_compatible(self, meta: dict, path: Path) -> None:
        cfg = self.t.cfg
        info = meta["model_info"]
        if info.get("architecture") != cfg.model.name or info.get("num_classes") != cfg.model.num_classes:
            raise UserError(
                f"checkpoint '{path}' holds a {info.get('architecture')} with {info.get('num_classes')} classes but the "
                f"config asks for {cfg.model.name} with {cfg.model.num_classes}; use another output_dir or resume=none"
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
            self.t.log(f"warning: world size changes from {meta['world_size']} to {self.t.world} processes with the same "
                       f"global batch {self.t.global_batch}; resuming (per-rank random states are re-derived)")

    # -- save -----------------------------------------------------------------------------------
    def save(self, reason: str, accuracy: Optional[float] = None) -> None:
        """Collective: every rank calls it at the same step; any failure fails every rank alike."""
        t = self.t
        err = None
        try:
            state, tensors = rng_state()
            per_rank = {"rng": state, "progress": {k: getattr(t.state, k) for k in _PER_RANK_FIELDS}}
            if getattr(t, "is_deepspeed", False):
                per_rank["zero"] = encode(zero_state(t), tensors, "zero")  # this rank's optimizer partition
            payload = (per_rank, tensors)
        except Exception as e:  # noqa: BLE001 - reported on every rank below, instead of a hang in the gather
            if t.world == 1:
                raise
            payload, err = None, f"save a checkpoint failed on rank {t.rank}: {type(e).__name__}: {e}"
        if t.world > 1:
            from accelerate.utils import gather_object

            # In memory between our own ranks, never from disk; every rank gets every rank's part (or error).
            gathered = gather_object([(payload, err)])
            errors = [e for _, e in gathered if e]
            if errors:
                raise RuntimeError(errors[0])
            payloads = [p for p, _ in gathered]
        else:
            payloads = [payload]
        started = time.time()
        path = t._agree("save a checkpoint", lambda: self._write(reason, accuracy, payloads), main_only=True)
        if t.is_main:
            t.metrics.log("checkpoint", step=t.state.global_step, reason=reason, path=str(path),
                          seconds=round(time.time() - started, 3))

    def _io_error(self, e: BaseException) -> UserError:
        why = getattr(e, "strerror", None) or str(e).splitlines()[0]
        return UserError(f"cannot write a checkpoint in '{self.dir}': {why}. Free space or fix permissions; "
                         f"earlier checkpoints are intact")

    def _write(self, reason: str, accuracy: Optional[float], payloads: list) -> Path:
        from safetensors import SafetensorError

        t = self.t
        acc = t.accelerator
        seq = 1 + max((int(_NAME.match(p.name).group(1)) for p in list_checkpoints(self.dir)), default=0)
        name = f"ckpt-{seq:06d}-step{t.state.global_step:08d}"
        tmp = self.dir / f".tmp-{name}-{os.getpid()}"
        final = self.dir / name
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        except OSError as e:
            raise self._io_error(e) from None
        sizes: dict[str, int] = {}
        digests: dict[str, str] = {}

        def put(fname: str, data: bytes) -> None:
            # One file at a time (peak memory ~ one serialized file); hashed in a thread while it is written
            # (both release the GIL): VGG16's 512 MB files take ~0.6 s less each.
            with ThreadPoolExecutor(1) as pool:
                digest = pool.submit(_sha256, data)
                _write(tmp / fname, data)
                sizes[fname], digests[fname] = len(data), digest.result()

        try:
            put("model.safetensors", _tensor_bytes(clean_state_dict(t.model_state_dict())))
            state_tensors: dict = {}
            # Under DeepSpeed the optimizer state is partitioned: it is in the rank files (see zero_state).
            opt = ZERO_MARKER if getattr(t, "is_deepspeed", False) else t.optimizer.state_dict()
            opt_struct = encode(opt, state_tensors, "opt")
            sched_struct = encode(t.scheduler.state_dict(), state_tensors, "sched")
            scaler_struct = encode(acc.scaler.state_dict(), state_tensors, "scaler") if acc.scaler is not None else None
            put("optimizer.safetensors", _tensor_bytes(state_tensors))
            del state_tensors
            for r, (per_rank, rtensors) in enumerate(payloads):
                put(f"rank-{r:05d}.json", json.dumps(per_rank).encode())
                put(f"rank-{r:05d}.safetensors", _tensor_bytes(rtensors))
            from distrain.data.pipeline import normalization
            from distrain.export import model_info

            mean, std = normalization(t.cfg)
            meta = {
                "format": FORMAT,
                "name": name,
                "reason": reason,
                "accuracy": accuracy,
                "train_state": {k: v for k, v in asdict(t.state).items() if k not in _PER_RANK_FIELDS},
                "config": t.cfg.to_dict(),
                "model_info": model_info(t.cfg, t.train_split.classes, mean, std),
                "world_size": t.world,
                "global_batch": t.global_batch,
                "optimizer": opt_struct,
                "scheduler": sched_struct,
                "scaler": scaler_struct,
                "versions": {"distrain": __version__, "torch": torch.__version__, "python": sys.version.split()[0],
                             "numpy": np.__version__, "safetensors": _version("safetensors"),
                             "accelerate": _version("accelerate")},
                "files": sorted(sizes),
                "sizes": sizes,
                "sha256": digests,
                "time": time.time(),
            }
            meta["digest"] = _meta_digest(meta)
            _write(tmp / STATE, json.dumps(meta).encode())
            _fsync_dir(tmp)
            os.rename(tmp, final)  # the commit
            _fsync_dir(self.dir)
            atomic_write_bytes(self.dir / POINTER, name.encode())
            _fsync_dir(self.dir)
        except (OSError, SafetensorError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise self._io_error(e) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
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
                if isinstance(a, (int, float)) and (best_acc is None or a > best_acc):
                    best, best_acc = p, a
            if best is not None:
                keep.add(best)
                try:
                    atomic_write_bytes(self.dir / BEST, best.name.encode())
                except OSError:
                    pass
        for p in found:
            if p not in keep:
                # Out of the namespace first (atomic), so no half-deleted checkpoint keeps a valid name.
                doomed = self.dir / f".tmp-delete-{p.name}"
                try:
                    os.rename(p, doomed)
                except OSError:
                    continue
                shutil.rmtree(doomed, ignore_errors=True)

    # -- load -----------------------------------------------------------------------------------
    def load(self, path: Path):
        """Restore model, optimizer, scheduler, scaler, progress and this rank's RNG from ``path``."""
        from distrain.engine import TrainState

        t = self.t
        path = Path(path)
        meta = read_meta(path)
        # Before any tensor is read: refuse the config changes this checkpoint cannot continue under.
        for warning in resume_policy.decide_from_meta(meta, t.cfg.to_dict(), f"checkpoint '{path}'").warnings:
            t.log(f"warning: {warning}")
        model = t.unwrapped()
        sd = _read_tensors(path / "model.safetensors")
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise UserError(f"checkpoint '{path}' does not fit the model: {str(e).splitlines()[0]}") from None
        state_tensors = _read_tensors(path / "optimizer.safetensors")
        try:
            opt = decode(meta["optimizer"], state_tensors)
            sched = decode(meta.get("scheduler"), state_tensors)
            scaler = decode(meta.get("scaler"), state_tensors)
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"checkpoint file '{path / STATE}' is damaged (bad optimizer record: {e})") from None
        if (opt == ZERO_MARKER) != bool(getattr(t, "is_deepspeed", False)):
            how = "under DeepSpeed" if opt == ZERO_MARKER else "without DeepSpeed"
            raise UserError(f"checkpoint '{path}' was written {how} ({meta['world_size']} processes): its optimizer state "
                            f"only resumes that way; launch it the same way, or start a new output_dir")
        try:
            if opt == ZERO_MARKER:
                self._load_zero(path, meta)
            else:
                t.optimizer.load_state_dict(opt)
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"checkpoint '{path}': optimizer state does not fit this config ({e}); "
                            "the optimizer or frozen layers changed") from None
        if sched is not None:
            t.scheduler.load_state_dict(sched)
        if scaler is not None and t.accelerator.scaler is not None:
            t.accelerator.scaler.load_state_dict(scaler)
        apply_optimizer_hparams(t.optimizer, t.scheduler, t.cfg.train, t.cfg.model)  # this run's, not the saved ones
        known = {f.name for f in fields(TrainState)}
        state = TrainState(**{k: v for k, v in meta["train_state"].items() if k in known})
        state.finished = False  # fit() decides from the (possibly longer) schedule of this run
        same_world = meta["world_size"] == t.world
        rank_json = path / f"rank-{t.rank:05d}.json"
        if same_world and rank_json.is_file():
            per_rank = self._rank_record(path, t.rank)
            set_rng_state(per_rank["rng"], _read_tensors(path / f"rank-{t.rank:05d}.safetensors"))
            for k, v in per_rank["progress"].items():
                if k in _PER_RANK_FIELDS:
                    setattr(state, k, v)
        else:
            from distrain.data.sampling import derived_seed

            seed = derived_seed(t.cfg.train.seed, t.rank, state.global_step)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            if t.rank == 0:
                # The epoch's running totals of all old ranks go to the new rank 0: summed over ranks when
                # the epoch ends, they still describe the whole epoch.
                for r in range(meta["world_size"]):
                    if (path / f"rank-{r:05d}.json").is_file():
                        progress = self._rank_record(path, r)["progress"]
                        for k in _PER_RANK_FIELDS:
                            setattr(state, k, getattr(state, k) + progress.get(k, 0))
        if meta["global_batch"] != t.global_batch and state.step_in_epoch:
            state.step_in_epoch = self._convert_position(state, meta["global_batch"])
        if t.is_main and t.cfg.log.trace_samples:
            old_accum = meta["config"].get("train", {}).get("grad_accum_steps", 1)
            trim_traces(t.run_dir, state.epoch, state.step_in_epoch, old_accum)
        return state

    def _load_zero(self, path: Path, meta: dict) -> None:
        t = self.t
        if meta["world_size"] != t.world:
            raise UserError(f"checkpoint '{path}' holds DeepSpeed ZeRO optimizer partitions of {meta['world_size']} processes; "
                            f"resume it with {meta['world_size']} processes (this run has {t.world})")
        rec = self._rank_record(path, t.rank)
        if "zero" not in rec:
            raise UserError(f"checkpoint file '{path / f'rank-{t.rank:05d}.json'}' has no DeepSpeed optimizer partition")
        load_zero_state(t, decode(rec["zero"], _read_tensors(path / f"rank-{t.rank:05d}.safetensors")))

    def _rank_record(self, path: Path, rank: int) -> dict:
        f = path / f"rank-{rank:05d}.json"
        try:
            rec = json.loads(f.read_bytes())
            rec["rng"], rec["progress"]  # noqa: B018 - presence check
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"checkpoint file '{f}' is damaged ({type(e).__name__}: {e})") from None
        return rec

    def _convert_position(self, state, old_global_batch: int) -> int:
        """The step inside the epoch with the new global batch that has used about as many images (allow_batch_change)."""
        t = self.t
        n = len(t.train_split)
        done = min(n, state.step_in_epoch * old_global_batch)
        plan = t.plan(state.epoch)
        if done >= n:
            return plan.num_steps
        new = done // t.global_batch
        if new * t.global_batch != done:
            t.log(f"warning: with the new global batch, epoch {state.epoch} continues at step {new}; "
                  f"{done - new * t.global_batch} images of it are used twice")
        return new


def _version(pkg: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # noqa: BLE001 - only informational
        return None
