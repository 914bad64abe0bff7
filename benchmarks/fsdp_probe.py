"""What of FSDP2 (`fully_shard`) runs here: a standalone probe, one JSON report per process on stdout.

    accelerate launch --config_file launch/fsdp.yaml --num_processes 2 benchmarks/fsdp_probe.py MODE

MODE ``accelerate``: which distributed type Accelerate picks under the FSDP config, with ``cpu=False``
(``--cpu``: ``cpu=True``), and whether ``accelerator.prepare(model)`` shards the model. MODE ``torch``:
an Accelerate process group (``cpu=True`` on a host without CUDA, gloo) and distrain's CIFAR10-quick
net sharded with torch's own ``fully_shard``, then, each step recorded as ok or the error it raised:

1. a few SGD steps on a global batch split over the ranks, against the same steps of an unsharded copy
   on the whole batch (world-size invariance);
2. the full model state_dict gathered on rank 0 (``get_model_state_dict`` with
   ``StateDictOptions(full_state_dict=True, cpu_offload=True)``), loaded strictly into a plain model;
3. sharded model and optimizer state per rank as safetensors (DTensor -> ``to_local()``) plus the
   placements and global shapes as JSON; a fresh sharded model and optimizer loaded from them
   (``DTensor.from_local``, ``set_model_state_dict`` / ``set_optimizer_state_dict``) continue exactly
   like the original;
4. bf16 ``MixedPrecisionPolicy`` on this device; a frozen backbone, then unfrozen.

Nothing here is part of distrain; it answers "does it start, and what breaks" for /work/coord/fsdp.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

STEPS = 3
BATCH = 16  # global
DEVICE = torch.device("cpu")  # the process's device (cuda:N under a GPU launch), set by probe_torch


def _try(report: dict, name: str, fn):
    try:
        out = fn()
        report[name] = {"ok": True, **(out or {})}
    except Exception as e:  # noqa: BLE001 - a probe records every failure and goes on
        report[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:600],
                        "where": traceback.format_exc().strip().splitlines()[-3:]}
    return report[name]["ok"]


def probe_accelerate(cpu: bool) -> dict:
    from accelerate import Accelerator

    acc = Accelerator(cpu=cpu)
    model = _model()
    rep = {"mode": "accelerate", "cpu": cpu, "distributed_type": str(acc.distributed_type),
           "num_processes": acc.num_processes, "process_index": acc.process_index, "device": str(acc.device),
           "env_ACCELERATE_USE_FSDP": os.environ.get("ACCELERATE_USE_FSDP"),
           "env_FSDP_VERSION": os.environ.get("FSDP_VERSION")}

    def prep():
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        m, _ = acc.prepare(model, opt)
        return {"prepared_type": type(m).__name__, "param_type": type(next(m.parameters())).__name__}

    _try(rep, "prepare", prep)
    return rep


def _model():
    from distrain.models import build_model

    torch.manual_seed(0)
    return build_model("cifar10_quick", num_classes=10).to(DEVICE)


def _data(step: int):
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    return x.to(DEVICE), y.to(DEVICE)


def _shard(model, mp=None):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mp_policy": mp or MixedPrecisionPolicy()}
    for layer in model.model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def _step(model, opt, step: int, rank: int, world: int, sharded: bool) -> float:
    x, y = _data(step)
    if sharded:  # this rank's contiguous slice of the global batch
        per = BATCH // world
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    loss = F.cross_entropy(model(x), y, reduction="sum")
    # FSDP averages gradients over ranks: scale the sum so the result is the mean over the global batch.
    (loss * ((world if sharded else 1) / BATCH)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def _diff(a: dict, b: dict) -> float:
    return max((a[k].float().cpu() - b[k].float().cpu()).abs().max().item() for k in a)


def _full_sd(model) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _encode_sharded(sd: dict, prefix: str, tensors: dict, meta: dict) -> None:
    """Flatten a (possibly nested) sharded state dict: local shards into ``tensors``, layout into ``meta``."""
    from torch.distributed.tensor import DTensor

    for k, v in sd.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            _encode_sharded(v, key + "/", tensors, meta)
        elif isinstance(v, DTensor):
            tensors[key] = v.to_local().detach().cpu().contiguous()
            meta[key] = {"dtensor": True, "shape": list(v.shape), "stride": list(v.stride()),
                         "placements": [repr(p) for p in v.placements]}
        elif isinstance(v, torch.Tensor):
            tensors[key] = v.detach().cpu().contiguous()
            meta[key] = {"dtensor": False}
        else:
            meta[key] = {"value": v}


def _placement(text: str):
    from torch.distributed.tensor import Replicate, Shard

    if text.startswith("Shard(dim="):
        return Shard(int(text[len("Shard(dim="):-1]))
    if text == "Replicate()":
        return Replicate()
    raise ValueError(f"placement {text!r}")


def _decode_sharded(tensors: dict, meta: dict, mesh) -> dict:
    from torch.distributed.tensor import DTensor

    out: dict = {}
    for key, m in meta.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(int(p) if p.isdigit() else p, {})
        if "value" in m:
            node[leaf] = m["value"]
        elif m["dtensor"]:
            node[leaf] = DTensor.from_local(tensors[key], mesh, [_placement(p) for p in m["placements"]],
                                            run_check=False, shape=torch.Size(m["shape"]), stride=tuple(m["stride"]))
        else:
            node[leaf] = tensors[key]
    return out


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)


def probe_torch(tmp: Path) -> dict:
    from accelerate import Accelerator

    global DEVICE
    acc = Accelerator(cpu=not torch.cuda.is_available())
    rank, world, DEVICE = acc.process_index, acc.num_processes, acc.device
    rep: dict = {"mode": "torch", "rank": rank, "world": world, "distributed_type": str(acc.distributed_type),
                 "backend": acc.state.backend, "torch": torch.__version__}
    ref = _model()
    ref_opt = _sgd(ref)
    sharded = _shard(copy.deepcopy(ref))
    opt = _sgd(sharded)
    rep["param_type_after_fully_shard"] = type(next(sharded.parameters())).__name__

    def train():
        for s in range(STEPS):
            _step(sharded, opt, s, rank, world, True)
            _step(ref, ref_opt, s, rank, world, False)
        full = _full_sd(sharded)
        out = {"full_sd_keys_on_this_rank": len(full)}
        if full:
            out["max_abs_diff_vs_unsharded"] = _diff(full, ref.state_dict())
            if out["max_abs_diff_vs_unsharded"] > 1e-5:
                raise AssertionError(f"sharded training differs from unsharded: {out}")
        return out

    if not _try(rep, "train_steps_vs_unsharded", train):
        return rep

    def full_gather():
        full = _full_sd(sharded)
        if rank != 0:
            return {"keys": len(full)}
        plain = _model()
        plain.load_state_dict(full, strict=True)
        return {"keys": len(full), "dtypes": sorted({str(v.dtype) for v in full.values()}),
                "devices": sorted({str(v.device) for v in full.values()}), "strict_load": True}

    _try(rep, "full_state_dict_rank0", full_gather)
    _try(rep, "sharded_save_and_reload", lambda: _save_reload(sharded, opt, ref, ref_opt, rank, world, tmp))
    _try(rep, "bf16_mixed_precision", lambda: _bf16(rank, world))
    _try(rep, "freeze_then_unfreeze", lambda: _freeze(rank, world))
    _try(rep, "empty_batch_on_one_rank", lambda: _empty_batch(rank))
    _try(rep, "channels_last", lambda: _channels_last(rank, world))
    if os.environ.get("FSDP_PROBE_COMPILE") == "1":
        _try(rep, "compile", lambda: _compiled(rank, world))
    return rep


def _empty_batch(rank: int) -> dict:
    """The last micro-batch of an epoch may leave a rank with no images: it still joins the collectives."""
    m = _shard(_model())
    o = _sgd(m)
    x, y = _data(0)
    n = 0 if rank == 1 else 8
    loss = F.cross_entropy(m(x[:n]), y[:n], reduction="sum")
    loss.backward()
    o.step()
    return {"images_on_this_rank": n}


def _channels_last(rank: int, world: int) -> dict:
    m = _shard(_model().to(memory_format=torch.channels_last))
    o = _sgd(m)
    losses = [_step(m, o, s, rank, world, True) for s in range(2)]
    return {"losses": losses}


def _compiled(rank: int, world: int) -> dict:
    m = torch.compile(_shard(_model()))
    o = _sgd(m)
    losses = [_step(m, o, s, rank, world, True) for s in range(2)]
    return {"losses": losses}


def _save_reload(sharded, opt, ref, ref_opt, rank: int, world: int, tmp: Path) -> dict:
    from safetensors.torch import load_file, save_file
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    tensors: dict = {}
    meta: dict = {}
    _encode_sharded(get_model_state_dict(sharded), "model/", tensors, meta)
    _encode_sharded(get_optimizer_state_dict(sharded, opt), "optim/", tensors, meta)
    save_file(tensors, str(tmp / f"rank-{rank}.safetensors"))
    (tmp / f"rank-{rank}.json").write_text(json.dumps(meta))

    fresh = _shard(_model())  # different weights than the trained model until loaded
    fresh_opt = _sgd(fresh)
    mesh = next(fresh.parameters()).device_mesh
    loaded = _decode_sharded(load_file(str(tmp / f"rank-{rank}.safetensors")),
                             json.loads((tmp / f"rank-{rank}.json").read_text()), mesh)
    set_model_state_dict(fresh, loaded["model"])
    set_optimizer_state_dict(fresh, fresh_opt, loaded["optim"])
    for s in range(STEPS, STEPS + 2):  # both continue: identical?
        _step(sharded, opt, s, rank, world, True)
        _step(fresh, fresh_opt, s, rank, world, True)
        _step(ref, ref_opt, s, rank, world, False)
    a, b = _full_sd(sharded), _full_sd(fresh)
    out = {"local_tensors": len(tensors), "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
           "example_meta": {k: v for k, v in list(meta.items()) if "momentum" in k or "weight" in k}}
    if a:
        out["resumed_vs_original_max_abs_diff"] = _diff(a, b)
        out["resumed_vs_unsharded_max_abs_diff"] = _diff(b, ref.state_dict())
        if out["resumed_vs_original_max_abs_diff"] != 0.0:
            raise AssertionError(f"the reloaded shards do not continue exactly: {out}")
    out["example_meta"] = dict(list(out["example_meta"].items())[:3])
    return out


def _bf16(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    m = _shard(_model(), MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    o = _sgd(m)
    losses = [_step(m, o, s, rank, world, True) for s in range(STEPS)]
    return {"losses": losses, "param_dtype": str(next(m.parameters()).dtype)}


def _freeze(rank: int, world: int) -> dict:
    from distrain.models import backbone_and_head

    m = _model()
    for p in backbone_and_head(m)[0]:
        p.requires_grad_(False)
    m = _shard(m)
    o = _sgd(m)
    before = {k: v.clone() for k, v in _full_sd(m).items()}
    _step(m, o, 0, rank, world, True)
    after = _full_sd(m)
    out = {}
    if after:
        out["frozen_changed"] = [k for k in after if k.startswith(("model.0", "model.2", "model.4"))
                                 and not torch.equal(after[k], before[k])]
        if out["frozen_changed"]:
            raise AssertionError(f"frozen parameters changed: {out['frozen_changed']}")
        out["head_changed"] = any(not torch.equal(after[k], before[k]) for k in after if k.startswith("model.7"))
    for p in m.parameters():
        p.requires_grad_(True)
    _step(m, o, 1, rank, world, True)
    after2 = _full_sd(m)
    if after2:
        out["unfrozen_backbone_changed"] = any(not torch.equal(after2[k], after[k]) for k in after2
                                               if k.startswith("model.0"))
    return out


def main() -> int:  # noqa: D103
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["accelerate", "torch"])
    p.add_argument("--cpu", action="store_true", help="accelerate mode: Accelerator(cpu=True)")
    args = p.parse_args()
    if args.mode == "accelerate":
        rep = probe_accelerate(args.cpu)
    else:
        with tempfile.TemporaryDirectory(prefix="fsdp-probe-") as d:
            shared = Path(os.environ.get("FSDP_PROBE_DIR", d))
            shared.mkdir(parents=True, exist_ok=True)
            rep = probe_torch(shared)
    print(json.dumps(rep, default=str), flush=True)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
