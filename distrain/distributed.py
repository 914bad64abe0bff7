"""Distribution, owned in one place: the Accelerator, the precision that runs, every collective and
every backend quirk (DDP, DeepSpeed ZeRO-2, FSDP2, a single process).

Nothing else in distrain imports accelerate, torch.distributed or deepspeed: the loop, the checkpoint
store and the commands call the verbs of `Strategy`, and the loop never asks which backend runs.

Invariants:
- `resolve_runtime` decides device and precision from the config alone, before any process group exists,
  so every rank gets the same answer (and the same UserError).
- `Strategy.agree` is how every phase that may fail on bad input runs: all ranks raise the same error,
  none waits forever in a collective for a rank that failed.
- A micro-batch's loss is a sum scaled by the caller; `micro_step` only decides whether gradients are
  synchronised (DDP's no_sync, DeepSpeed's accumulation boundary) and where autocast applies.
- `model_state_dict` is the full, unwrapped fp32-or-native state dict on every backend; ZeRO's optimizer
  partitions are per-rank records (`optimizer_shard`), stored by the checkpoint code as tensors + JSON.
- Under FSDP forward passes and `model_state_dict` are collectives: every rank calls
  `model_state_dict` (the main process gets the whole model, the others {}), and evaluation batches
  go through `lockstep`. `optimizer_shard` holds this rank's model and optimizer shards (DTensor local
  tensors + their layout), which resume only at the same world size.
- ``DISTRAIN_DIST_BACKEND=gloo`` (with Accelerate's ``ACCELERATE_TORCH_DEVICE=cuda:0``) puts several
  ranks on one GPU, which NCCL refuses: for testing the collectives on a machine with one GPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from distrain.errors import UserError

ZERO_MARKER = {"deepspeed_zero": "per-rank"}  # what a checkpoint's optimizer record holds under ZeRO
FSDP_MARKER = {"fsdp": "per-rank"}  # ... and under FSDP (the shards are in the rank files)


# ----------------------------------------------------------------------------------------------------
# Device and precision


@dataclass
class Runtime:
    device: str  # "cpu" or "cuda"
    precision: str  # what actually runs: "no", "fp16", "bf16"
    note: str  # one line for the log: what was asked, what runs, why


def resolve_runtime(device: str, precision: str) -> Runtime:
    """Decide device and precision before any process group exists; the same answer on every rank."""
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise UserError("config key 'train.device=cuda' but no CUDA GPU is visible; "
                        "use train.device=auto or cpu")
    dev = "cuda" if (device == "cuda" or (device == "auto" and has_cuda)) else "cpu"
    bf16_ok = dev == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        if dev == "cpu":
            return Runtime(dev, "no", "mixed precision auto -> fp32 "
                                      "(no CUDA GPU; CPU autocast would be slower)")
        p = "bf16" if bf16_ok else "fp16"
        return Runtime(dev, p, f"mixed precision auto -> {p} on {torch.cuda.get_device_name()}")
    if precision == "fp16" and dev == "cpu":
        raise UserError("config key 'train.mixed_precision=fp16' needs a CUDA GPU and none is in use; "
                        "use train.mixed_precision=bf16 (CPU autocast), no or auto")
    if precision == "bf16" and dev == "cuda" and not bf16_ok:
        raise UserError(f"config key 'train.mixed_precision=bf16': {torch.cuda.get_device_name()} "
                        "has no bf16 support; use fp16 or auto")
    if precision == "bf16" and dev == "cpu":
        return Runtime(dev, "bf16", "mixed precision bf16 -> bf16 autocast on the CPU (as asked)")
    return Runtime(dev, precision, f"mixed precision {precision} on {dev}")


def autocast(device_type: str, precision: str):
    """torch.autocast for the precision that runs (a no-op for fp32)."""
    if precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type, dtype=dtype)


def deepspeed_requested() -> bool:
    """True under `accelerate launch --config_file launch/deepspeed_zero2.yaml`."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / DeepSpeed (`.module`) and torch.compile (`._orig_mod`) wrappers.

    Not accelerator.unwrap_model: it imports DeepSpeed whenever DeepSpeed is installed, which costs
    seconds of CPU detection and prints to stdout.
    """
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) \
                or type(model).__name__ == "DeepSpeedEngine":
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# ----------------------------------------------------------------------------------------------------
# The strategy


@dataclass
class DistOptions:
    """What the training config says about distribution (decided once, from `train.*`)."""

    comm_hook: str = "none"  # DDP gradient all-reduce in "bf16"/"fp16", or "none"
    static_graph: bool = False  # DDP may skip per-step graph bookkeeping
    collective_timeout_s: Optional[float] = None  # None: the backend's default
    batch_size: int = 1
    grad_accum_steps: int = 1
    grad_clip: Optional[float] = None
    unfreezes: bool = False  # model.unfreeze_after_epochs is set


class Strategy:
    """The Accelerator and every collective of a run; one per process."""

    def __init__(self, rt: Runtime, opts: Optional[DistOptions] = None):
        self.rt, self.opts = rt, opts or DistOptions()
        # Read (and then hidden from Accelerate) before the Accelerator exists: see _fsdp_settings.
        self.fsdp: Optional[FsdpSettings] = _fsdp_settings(rt) if fsdp_requested() else None
        self._sharded: Optional[torch.nn.Module] = None  # the bare model, once fully_shard-ed
        self.accelerator = _make_accelerator(rt, self.opts)
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        self.is_main = acc.is_main_process
        self.device = acc.device
        from accelerate.utils import DistributedType

        self.is_deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))

    @property
    def precision(self) -> str:
        return self.rt.precision

    @property
    def global_batch(self) -> int:
        return self.opts.batch_size * self.world * self.opts.grad_accum_steps

    # -- agreement between ranks ----------------------------------------------------------------
    def agree(self, what: str, fn: Callable, main_only: bool = False):
        """Run ``fn`` (on every rank, or the main one while the others wait); fail everywhere if it
        fails anywhere, with the first failing rank's message."""
        err: Optional[str] = None
        out = None
        if self.is_main or not main_only:
            try:
                out = fn()
            except UserError as e:
                err = "user:" + str(e)
            except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                err = f"bug:{what} failed on rank {self.rank}: {type(e).__name__}: {e}"
                if self.world == 1:
                    raise
        if self.world > 1:
            errs = [e for e in self.gather_objects(err) if e]
            err = errs[0] if errs else None
        if err:
            kind, msg = err.split(":", 1)
            if kind == "user":
                raise UserError(msg)
            raise RuntimeError(msg)
        return out

    def gather_objects(self, obj: Any) -> list:
        """Every rank's ``obj`` (picklable, in memory between our own ranks), on every rank."""
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        return t.tolist()

    def any(self, flag: bool) -> bool:
        return flag if self.world == 1 else self.sum([1.0 if flag else 0.0])[0] > 0

    def reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a device tensor over ranks (returns the reduced tensor)."""
        return t if self.world == 1 else self.accelerator.reduce(t, reduction="sum")

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.world == 1 else self.accelerator.gather(t)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    # -- model and optimizer --------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, optimizer):
        """Place and wrap the model (DDP / DeepSpeed / FSDP) and the optimizer; returns both."""
        if self.is_deepspeed:
            self.agree("configure DeepSpeed", self._configure_deepspeed)
        if self.fsdp is not None:  # sharded in place, never given to Accelerate (no DDP around it)
            model = model.to(self.device)
            self.agree("shard the model (FSDP)", lambda: _fully_shard(model, optimizer, self.fsdp))
            self._sharded = unwrap(model)
            optimizer = self.accelerator.prepare(optimizer)
        else:
            model, optimizer = self.accelerator.prepare(model, optimizer)
        # Accelerate's optimizer wrapper costs ~0.1 ms of Python per step; without a GradScaler or
        # DeepSpeed its step/zero_grad are exactly the wrapped optimizer's, so call that one.
        self._raw_opt = optimizer if self.is_deepspeed or optimizer.scaler is not None \
            else optimizer.optimizer
        return model, optimizer

    def _configure_deepspeed(self) -> None:
        """DeepSpeed's batch keys come from the run config (its train_batch_size assertion must hold).

        DeepSpeed steps the optimizer inside ``backward`` on the step's last micro-batch and clips
        there, so gradient_clipping is train.grad_clip (0 = off; Accelerate's default would be 1.0).
        """
        o = self.opts
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin.zero_stage == 3:
            raise UserError("DeepSpeed ZeRO stage 3 is not supported (uneven evaluation shards would "
                            "hang its parameter gathers); use launch/deepspeed_zero2.yaml")
        if o.unfreezes:
            raise UserError("config key 'model.unfreeze_after_epochs' is not supported under DeepSpeed "
                            "(its optimizer is built once over the trainable parameters); launch "
                            "without the DeepSpeed config")
        ds = plugin.deepspeed_config
        for section in ("optimizer", "scheduler"):
            if section in ds:
                raise UserError(f"the DeepSpeed config has a '{section}' section; remove it: distrain "
                                f"builds the {section} from train.optimizer / train.scheduler")
        ds["train_micro_batch_size_per_gpu"] = o.batch_size
        ds["gradient_accumulation_steps"] = o.grad_accum_steps
        ds["train_batch_size"] = self.global_batch
        ds["gradient_clipping"] = o.grad_clip or 0.0
        self.accelerator.gradient_accumulation_steps = o.grad_accum_steps  # keeps Accelerate quiet

    def notes(self) -> list[str]:
        """Warnings about settings this backend ignores (for the run log)."""
        if (self.is_deepspeed or self.fsdp) and self.opts.comm_hook != "none":
            return [f"warning: train.ddp_comm_hook={self.opts.comm_hook} applies to DDP and is ignored "
                    f"under {'DeepSpeed' if self.is_deepspeed else 'FSDP'}"]
        return []

    @contextlib.contextmanager
    def micro_step(self, model, last: bool):
        """One micro-batch's forward and backward: gradients are synchronised only on the ``last``
        micro-batch of an optimizer step (DDP no_sync / DeepSpeed's accumulation boundary)."""
        acc = self.accelerator
        if self.is_deepspeed:
            # accelerator.backward() runs engine.backward() and, on a sync boundary, engine.step()
            # (clip, step, zero_grad). The module itself is 16-bit under bf16/fp16: autocast casts
            # the fp32 inputs.
            acc.sync_gradients = last
            with autocast(self.device.type, self.precision):
                yield
        elif self._sharded is not None:  # FSDP2's no_sync: keep unsharded gradients until the last
            self._sharded.set_requires_gradient_sync(last)
            yield
        elif last:
            yield
        else:
            with acc.no_sync(model):
                yield

    def backward(self, loss: torch.Tensor) -> None:
        # The caller scaled the loss for the whole optimizer step: DeepSpeed must not divide it by its
        # accumulation steps again.
        kwargs = {"scale_wrt_gas": False} if self.is_deepspeed else {}
        self.accelerator.backward(loss, **kwargs)

    def optimizer_step(self, model) -> bool:
        """Clip (train.grad_clip), step and zero the gradients; False when the step was skipped
        (fp16 overflow), so the caller does not advance the LR schedule."""
        if self.opts.grad_clip is not None and not self.is_deepspeed:  # DeepSpeed clipped in backward
            self.accelerator.clip_grad_norm_(model.parameters(), self.opts.grad_clip)
        self._raw_opt.step()  # a no-op under DeepSpeed (done in backward)
        skipped = self.accelerator.optimizer_step_was_skipped
        self._raw_opt.zero_grad(set_to_none=True)
        return not skipped

    def model_state_dict(self, model) -> dict:
        """Full state_dict of the bare model, as the export and checkpoints store it. Called on every
        rank: under FSDP it is a gather, whose result only the main process gets ({} elsewhere)."""
        if self._sharded is not None:
            return _fsdp_full_state_dict(self._sharded)
        if self.is_deepspeed:
            return self.accelerator.get_state_dict(model, unwrap=True)
        return unwrap(model).state_dict()

    def load_model_state(self, model, sd: dict) -> None:
        """Load a full state_dict (every rank holds ``sd``) strictly into the bare model; RuntimeError
        when it does not fit. Under FSDP it is only checked: the weights are in this rank's shards,
        which `load_optimizer_state` loads."""
        if self._sharded is not None:
            _fsdp_check_full(self._sharded, sd)
        else:
            unwrap(model).load_state_dict(sd, strict=True)

    def lockstep(self, batches):
        """Evaluation batches, in step on every rank when forward passes are collectives (FSDP): a
        rank that is done runs empty batches until all are; a UserError from its data is raised
        after the last batch (so every rank runs the same collectives)."""
        if self._sharded is None or self.world == 1:
            return iter(batches)
        return _lockstep(self, batches)

    def rewrap(self, model):
        """After parameters changed requires_grad (an unfreeze): DDP registered only the parameters
        that required gradients when it was built, so build it again around the same module. FSDP2
        reduces every gradient that exists: nothing to rebuild."""
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return model
        acc = self.accelerator
        kwargs = acc.ddp_handler.to_kwargs() if acc.ddp_handler is not None else {}
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(model.module, device_ids=ids,
                                                        output_device=ids and ids[0], **kwargs)
        if acc.ddp_handler is not None:
            acc.ddp_handler.register_comm_hook(ddp)
        # Accelerate keeps the models it prepared (for its own save/unwrap); the old wrapper must go.
        acc._models[:] = [ddp if m is model else m for m in acc._models]
        return ddp

    # -- optimizer state for checkpoints --------------------------------------------------------
    def optimizer_state(self, optimizer) -> dict:
        """The optimizer's state_dict, or a marker when it is partitioned across ranks."""
        if self.fsdp is not None:
            return dict(FSDP_MARKER)
        return dict(ZERO_MARKER) if self.is_deepspeed else optimizer.state_dict()

    def optimizer_shard(self, optimizer) -> Optional[dict]:
        """This rank's ZeRO partition (torch optimizer state over the flat fp32 partition, the fp32
        master partition when the model is 16-bit, the loss scale); None without DeepSpeed.

        ZeRO's own state_dict() holds Python objects a pickle-free checkpoint cannot store. Under
        FSDP: this rank's shards of the model and of the optimizer state (see `_fsdp_shard`)."""
        if self._sharded is not None:
            return _fsdp_shard(self._sharded, optimizer.optimizer)
        if not self.is_deepspeed:
            return None
        zo = optimizer.optimizer  # Accelerate's DeepSpeedOptimizerWrapper -> DeepSpeedZeroOptimizer
        state = {"base": zo.optimizer.state_dict(),
                 "loss_scaler": {k: v for k, v in vars(zo.loss_scaler).items()
                                 if type(v) in (bool, int, float)}}
        if self.precision != "no":  # fp32 model weights are the master weights; 16-bit ones are not
            state["fp32"] = [p.detach() for p in zo.single_partition_of_fp32_groups]
        return state

    @torch.no_grad()
    def load_optimizer_state(self, optimizer, state: dict, shard: Optional[dict]) -> None:
        """After the model weights are loaded: the optimizer state (or this rank's ZeRO partition, or
        this rank's FSDP model and optimizer shards)."""
        if self._sharded is not None:
            _fsdp_load_shard(self._sharded, optimizer.optimizer, shard)
            return
        if not self.is_deepspeed:
            optimizer.load_state_dict(state)
            return
        zo = optimizer.optimizer
        zo.optimizer.load_state_dict(shard["base"])
        if "fp32" in shard:
            for dst, src in zip(zo.single_partition_of_fp32_groups, shard["fp32"], strict=True):
                dst.copy_(src)
        else:
            zo.refresh_fp32_params()  # master partition from the (fp32) weights just loaded
        for k, v in shard["loss_scaler"].items():
            setattr(zo.loss_scaler, k, v)

    def scaler_state(self) -> Optional[dict]:
        scaler = self.accelerator.scaler
        return scaler.state_dict() if scaler is not None else None

    def load_scaler_state(self, state: Optional[dict]) -> None:
        if state is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state)

    def watch_peers(self, timeout_s: Optional[float], signals=None, log=print):
        """Start the peer watchdog (distrain/watchdog.py) on a store client of its own: a frozen or
        lost rank is reported within ``timeout_s`` instead of gloo's collective timeout. None when
        there is nothing to watch (one process, ``timeout_s`` None, no rendezvous store)."""
        if self.world == 1 or timeout_s is None or "MASTER_PORT" not in os.environ:
            return None
        import torch.distributed as dist

        from distrain.watchdog import Watchdog, default_interval

        try:
            # Not the process group's own client (private, and a blocked heartbeat would hold its lock).
            client = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"),
                                   int(os.environ["MASTER_PORT"]), is_master=False,
                                   wait_for_workers=False,
                                   timeout=timedelta(seconds=2 * default_interval(timeout_s)))
        except Exception as e:  # noqa: BLE001 - training goes on, unwatched, and says so
            log(f"warning: no peer watchdog (cannot reach the rendezvous store: {e})")
            return None
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"distrain/watchdog/{restart}/", client)
        return Watchdog(store, self.rank, self.world, timeout_s, stop=signals).start()

    # -- end ------------------------------------------------------------------------------------
    def close(self) -> None:
        """End distribution (all ranks, after their last collective) so that no thread of the
        collective library is busy when the interpreter finalizes.

        torch + gloo (pytorch/pytorch#190489): a gloo worker thread lets go of a finished collective a
        little after it returned; if the interpreter is finalizing by then, the thread ends inside a
        C++ destructor and std::terminate aborts the process ("terminate called without an active
        exception"). The group cannot simply be freed (DDP keeps references), so: destroy it, then
        hold the GIL back until no other thread of this process is runnable (bounded).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        self.accelerator.end_training()  # destroy_process_group()
        _let_threads_settle()


def _make_accelerator(rt: Runtime, o: DistOptions):
    from accelerate import Accelerator
    from accelerate.utils import (DDPCommunicationHookType, DistributedDataParallelKwargs,
                                  InitProcessGroupKwargs)

    # gradient_as_bucket_view saves a gradient-sized copy (VGG16: 0.5 GB in fp32).
    hook = {"none": DDPCommunicationHookType.NO, "bf16": DDPCommunicationHookType.BF16,
            "fp16": DDPCommunicationHookType.FP16}[o.comm_hook]
    handlers: list = [DistributedDataParallelKwargs(gradient_as_bucket_view=True, comm_hook=hook,
                                                    static_graph=o.static_graph)]
    pg: dict = {}
    if o.collective_timeout_s is not None:
        # Accelerate passes on only the fields that differ from InitProcessGroupKwargs()'s own (600 s):
        # the microsecond keeps a 600 s setting from silently becoming torch's default.
        pg["timeout"] = timedelta(seconds=o.collective_timeout_s, microseconds=1)
    backend = os.environ.get("DISTRAIN_DIST_BACKEND")
    if backend:
        if backend not in ("gloo", "nccl"):
            raise UserError(f"DISTRAIN_DIST_BACKEND must be gloo or nccl, got {backend!r}")
        pg["backend"] = backend
    cpu = rt.device == "cpu"
    if deepspeed_requested():
        missing = [m for m in ("deepspeed", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            raise UserError(f"the accelerate config asks for DeepSpeed but {' and '.join(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} not installed; "
                            f"pip install 'distrain[deepspeed]'")
        # Accelerate turns DeepSpeed on only with cpu=False; on a CPU-only host its process group
        # then needs an explicit backend, or every process believes it is rank 0 of 1.
        cpu = False
        if rt.device == "cpu":
            if torch.cuda.is_available():
                raise UserError("DeepSpeed with train.device=cpu on a host with GPUs is not supported; "
                                "use train.device=auto")
            pg["backend"] = "gloo"
    if pg:
        handlers.append(InitProcessGroupKwargs(**pg))
    return Accelerator(cpu=cpu, mixed_precision=rt.precision, kwargs_handlers=handlers,
                       step_scheduler_with_optimizer=False)


# ----------------------------------------------------------------------------------------------------
# FSDP2 (torch's fully_shard), applied by distrain itself
#
# Accelerate 1.15 turns its FSDP on only for GPU-type backends: on CPU processes it silently runs
# each process alone (cpu=False) or plain DDP (cpu=True). So distrain reads Accelerate's FSDP launch
# settings itself, builds the Accelerator without them (a DDP-style process group: gloo on CPU, NCCL
# on CUDA) and shards the model with torch's fully_shard: one code path on every device.


def fsdp_requested() -> bool:
    """True under `accelerate launch --config_file launch/fsdp.yaml` (Accelerate's FSDP mode)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


@dataclass
class FsdpSettings:
    reshard_after_forward: bool  # full sharding: parameters are freed again after each layer's use


def _fsdp_settings(rt: Runtime) -> FsdpSettings:
    """Accelerate's FSDP launch settings (env FSDP_*), checked; hidden from Accelerate afterwards."""
    env = os.environ
    if env.get("FSDP_VERSION", "1") != "2":
        raise UserError(f"the accelerate config asks for FSDP version {env.get('FSDP_VERSION', '1')}; "
                        f"distrain supports FSDP2 only: set fsdp_version: 2 (launch/fsdp.yaml)")
    if env.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
        raise UserError("the accelerate config sets fsdp_offload_params: true, which distrain does not "
                        "support; set it to false (launch/fsdp.yaml)")
    if deepspeed_requested():
        raise UserError("the accelerate config asks for both FSDP and DeepSpeed; choose one")
    if rt.precision == "fp16":
        raise UserError("config key 'train.mixed_precision=fp16' is not supported under FSDP (each rank "
                        "would check only its own gradient shards for overflow); use bf16 or auto")
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
    env["ACCELERATE_USE_FSDP"] = "false"  # Accelerate builds the process group only; distrain shards
    return FsdpSettings(reshard_after_forward=reshard not in ("false", "no_shard", "2", "3"))


def _fully_shard(model: torch.nn.Module, optimizer, settings: FsdpSettings) -> None:
    """Shard ``model`` in place (each module holding parameters of its own, bottom-up, then the root)
    and re-point ``optimizer`` at the sharded parameters (fully_shard replaces them)."""
    from torch.distributed.fsdp import fully_shard

    bare = unwrap(model)
    if any(not p.is_contiguous() for p in bare.parameters()):
        raise UserError("config key 'model.channels_last=true' is not supported under FSDP (FSDP2 "
                        "cannot shard channels_last parameters); set model.channels_last=false")
    names = {id(p): n for n, p in bare.named_parameters()}
    for m in reversed(list(bare.modules())):
        if m is not bare and any(True for _ in m.parameters(recurse=False)):
            fully_shard(m, reshard_after_forward=settings.reshard_after_forward)
    fully_shard(bare, reshard_after_forward=settings.reshard_after_forward)
    sharded = dict(bare.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [sharded[names[id(p)]] for p in group["params"]]
        if isinstance(optimizer, torch.optim.SGD) and group.get("fused"):
            group["fused"] = False  # torch has no DTensor kernel for fused SGD: its foreach path


def _fsdp_full_state_dict(model) -> dict:
    """The whole model on the main process (CPU tensors), {} elsewhere; a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(unwrap(model), options=StateDictOptions(full_state_dict=True,
                                                                        cpu_offload=True))


def _fsdp_check_full(model, sd: dict) -> None:
    """That a full state_dict fits the sharded model (names and global shapes); RuntimeError if not.
    The weights themselves come back from this rank's shards (`_fsdp_load_shard`), which resume
    exactly without moving a full copy of the model through the collectives."""
    want = {k: tuple(v.shape) for k, v in unwrap(model).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if got != want:
        bad = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
        raise RuntimeError(f"state_dict does not match the model at {', '.join(bad[:3])}")


def _to_local(obj):
    """A sharded state dict with every DTensor as its local shard + layout (JSON-able + tensors)."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        return {"local": obj.to_local(), "shape": list(obj.shape), "stride": list(obj.stride()),
                "placements": [repr(p) for p in obj.placements], "__dtensor__": True}
    if isinstance(obj, dict):
        return {k: _to_local(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_local(v) for v in obj]
    return obj


def _placement(text: str):
    from torch.distributed.tensor import Replicate, Shard

    if text.startswith("Shard(dim=") and text.endswith(")"):
        return Shard(int(text[len("Shard(dim="):-1]))
    if text == "Replicate()":
        return Replicate()
    raise ValueError(f"unknown DTensor placement {text!r}")


def _from_local(obj, mesh):
    from torch.distributed.tensor import DTensor

    if isinstance(obj, dict) and obj.get("__dtensor__"):
        return DTensor.from_local(obj["local"].to(mesh.device_type), mesh,
                                  [_placement(p) for p in obj["placements"]], run_check=False,
                                  shape=torch.Size(obj["shape"]), stride=tuple(obj["stride"]))
    if isinstance(obj, dict):
        return {k: _from_local(v, mesh) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_local(v, mesh) for v in obj]
    return obj


def _fsdp_shard(model, optimizer) -> dict:
    """This rank's shards of the model and of the optimizer state (no pickle: tensors + layout)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    bare = unwrap(model)
    return {"model": _to_local(get_model_state_dict(bare)),
            "optimizer": _to_local(get_optimizer_state_dict(bare, optimizer))}


def _fsdp_load_shard(model, optimizer, shard: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    bare = unwrap(model)
    mesh = next(bare.parameters()).device_mesh
    set_model_state_dict(bare, _from_local(shard["model"], mesh))
    set_optimizer_state_dict(bare, optimizer, _from_local(shard["optimizer"], mesh))


def _lockstep(strategy: Strategy, batches):
    """`Strategy.lockstep` under FSDP: one small gather per batch says who still has one (and its
    shape, for the empty batches of those that have none)."""
    it, error = iter(batches), None
    while True:
        batch = None
        if error is None:
            try:
                batch = next(it, None)
            except UserError as e:  # raised after the last batch, when no rank needs this one
                error = e
        shapes = strategy.gather_objects(None if batch is None else tuple(batch[0].shape))
        known = [s for s in shapes if s is not None]
        if not known:
            break
        if batch is None:
            dev = strategy.device
            empty = torch.empty(0, dtype=torch.long, device=dev)
            batch = (torch.empty((0, *known[0][1:]), device=dev), empty, empty)
        yield batch
    if error is not None:
        raise error


def _let_threads_settle(timeout: float = 2.0, poll: float = 0.02) -> None:
    """Sleep (GIL released) until no thread of this process but the caller is runnable (state R in
    /proc), or ``timeout`` passed. Without /proc it just sleeps ``poll`` once."""
    me = str(threading.get_native_id())
    tasks = Path("/proc/self/task")
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(poll)
        if not tasks.is_dir() or time.monotonic() > deadline:
            return
        busy = False
        for t in tasks.iterdir():
            if t.name == me:
                continue
            try:
                state = (t / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            busy = busy or state == "R"
        if not busy:
            return


def wait_for_ranks_to_report(timeout: float = 10.0) -> None:
    """After this rank printed its error under a multi-process launch, wait (bounded) until every rank
    has: torchrun / `accelerate launch` terminate the other workers as soon as one exits, which could
    cut off a rank that has not printed its message yet. Each rank counts itself in the launcher's
    store (or the process group's) and leaves when all have, or after ``timeout`` seconds."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return
    store = None
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            store = dist.distributed_c10d._get_default_store()
        elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and os.environ.get("MASTER_ADDR"):
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                  is_master=False, timeout=timedelta(seconds=timeout),
                                  wait_for_workers=False)
    except Exception:  # noqa: BLE001 - best effort: fall back to the grace period
        store = None
    if store is None:
        time.sleep(min(timeout, 3.0))
        return
    key = f"distrain/user-error/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    deadline = time.monotonic() + timeout
    try:
        store.add(key, 1)
        while time.monotonic() < deadline and int(store.add(key, 0)) < world:
            time.sleep(0.01)
    except Exception:  # noqa: BLE001 - the store went away (the launcher is ending): nothing to wait for
        pass
