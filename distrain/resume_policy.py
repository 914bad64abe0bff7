"""What a resumed run does with each config key that differs from its checkpoint's config.

A resumed run records its own config (config.yaml, every new checkpoint), so each difference is
either honoured from the resume step on and announced with a warning naming the key, or refused
(exit 2, naming the key and the ways out) when the checkpoint cannot continue under it. Nothing is
ignored silently: the recorded config is the one that ran. The rules, key by key:

- optimizer: train.lr, train.momentum, train.weight_decay, train.nesterov, model.backbone_lr_mult.
  Honoured: set into the optimizer's parameter groups after its state is loaded
  (`optim.apply_optimizer_hparams`); the schedule keeps its position with the new base lr.
- honour: output_dir, data.root, data.download, data.verify, data.max_test_samples, data.loader,
  data.num_workers, model.channels_last, model.compile, train.epochs, train.max_steps,
  train.warmup_steps, train.step_epochs, train.step_gamma, train.label_smoothing, train.grad_clip,
  train.mixed_precision, train.device, train.eval_every_epochs, train.sanity_eval_batches,
  train.peer_timeout_s, train.collective_timeout_s, train.allow_batch_change, train.ddp_comm_hook,
  checkpoint.*, log.*. Honoured from the resume step
  (a new length or warm-up reshapes the rest of the schedule).
- batch: train.batch_size, train.grad_accum_steps. Honoured while the global batch (batch_size x
  processes x grad_accum_steps) stays; another one needs train.allow_batch_change=true, a rule the
  checkpoint code applies.
- epoch boundary: train.seed, data.name, data.max_train_samples, data.augment. Honoured at an epoch
  boundary; refused mid-epoch, where the rest of the epoch would use some images twice and others
  never (or with other augmentation).
- initial weights: model.pretrained, model.weights, model.weights_path. Announced as having no effect: a resumed
  run's weights come from the checkpoint.
- structure: model.unfreeze_after_epochs. Another epoch is honoured; setting or unsetting it is
  refused (it changes the optimizer's parameter groups).
- refuse: model.name, model.num_classes, model.input_size, model.cifar_stem, model.sync_bn,
  model.freeze_features, train.optimizer, train.scheduler. Refused: the checkpoint's model or optimizer state does not fit, or its schedule
  cannot continue.
- not compared: resume. It says where this run starts, not how it trains.

Keys missing from the checkpoint's config (written by another distrain version) are not compared.
`decide` is pure: it reads two config dicts and the checkpoint's position and returns a
`ResumeDecision` or raises UserError; the checkpoint code logs the warnings and applies the
optimizer values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distrain.errors import UserError, shorten

OPTIMIZER, HONOUR, BATCH, EPOCH_BOUNDARY = "optimizer", "honour", "batch", "epoch boundary"
INITIAL_WEIGHTS, STRUCTURE = "initial weights", "structure"
REFUSE, NOT_COMPARED = "refuse", "not compared"

_RULES: dict[str, tuple[str, ...]] = {
    OPTIMIZER: ("train.lr", "train.momentum", "train.weight_decay", "train.nesterov",
                "model.backbone_lr_mult"),
    BATCH: ("train.batch_size", "train.grad_accum_steps"),
    EPOCH_BOUNDARY: ("train.seed", "data.name", "data.max_train_samples", "data.augment"),
    INITIAL_WEIGHTS: ("model.pretrained", "model.weights", "model.weights_path"),
    STRUCTURE: ("model.unfreeze_after_epochs",),
    REFUSE: ("model.name", "model.num_classes", "model.input_size", "model.cifar_stem",
             "model.sync_bn", "model.freeze_features", "train.optimizer", "train.scheduler"),
    NOT_COMPARED: ("resume",),
}
# The optimizer hyper-parameter each OPTIMIZER key feeds (backbone_lr_mult scales the backbone lr).
_HPARAM = {"train.lr": "lr", "model.backbone_lr_mult": "lr", "train.momentum": "momentum",
           "train.weight_decay": "weight_decay", "train.nesterov": "nesterov"}
_WAYS_OUT = "revert it, or start afresh with resume=none or another output_dir"


def rule_of(key: str) -> str:
    """The rule for a dotted config key; every key not listed elsewhere is honoured."""
    for rule, keys in _RULES.items():
        if key in keys:
            return rule
    return HONOUR


@dataclass(frozen=True)
class ResumeDecision:
    """What the resumed run must do: announce ``warnings``; set ``reapply`` into the optimizer."""

    warnings: tuple[str, ...] = ()
    reapply: tuple[str, ...] = ()  # among "lr", "momentum", "weight_decay", "nesterov"
    changed: tuple[str, ...] = ()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + str(k)] = v
    return out


def _shown(value: Any) -> str:
    return "null" if value is None else shorten(value, 60)


def _change(key: str, old: Any, new: Any) -> str:
    return f"'{key}' changes from {_shown(old)} to {_shown(new)}"


def decide(old_config: dict, new_config: dict, mid_epoch: bool,
           where: str = "the checkpoint") -> ResumeDecision:
    """Key by key, what resuming a checkpoint written under ``old_config`` with ``new_config`` does.

    ``mid_epoch``: the checkpoint is inside an epoch (its train_state's step_in_epoch > 0).
    ``where`` names the checkpoint in messages. UserError names the first refused key (and others).
    """
    old, new = _flat(old_config), _flat(new_config)
    warnings, reapply, changed, refused = [], [], [], []
    for key, value in new.items():
        if key not in old or old[key] == value or rule_of(key) == NOT_COMPARED:
            continue
        rule, change = rule_of(key), _change(key, old[key], value)
        changed.append(key)
        if rule == REFUSE or (rule == STRUCTURE and (old[key] is None) != (value is None)):
            refused.append((key, f"{change}, which {where} cannot continue under"))
        elif rule == EPOCH_BOUNDARY and mid_epoch:
            refused.append((key, f"{change} in the middle of an epoch, which would use some of "
                                 f"its images twice and others never (allowed at an epoch "
                                 f"boundary)"))
        elif rule == INITIAL_WEIGHTS:
            warnings.append(f"{change}: no effect, a resumed run's weights come from {where}")
        else:
            note = {OPTIMIZER: ", applied from the resume step on",
                    BATCH: " (global-batch rule: see train.allow_batch_change)"}.get(
                rule, ", honoured from the resume step on")
            warnings.append(change + note)
            if rule == OPTIMIZER and _HPARAM[key] not in reapply:
                reapply.append(_HPARAM[key])
    if refused:
        key, why = refused[0]
        others = ", ".join(k for k, _ in refused[1:])
        more = f" (also refused: {others})" if others else ""
        raise UserError(f"cannot resume {where}: config key {why}; {_WAYS_OUT}{more}")
    return ResumeDecision(tuple(warnings), tuple(reapply), tuple(changed))


def decide_from_meta(meta: dict, new_config: dict, where: str) -> ResumeDecision:
    """`decide` for a checkpoint's state.json (its ``config`` and ``train_state``)."""
    old = meta.get("config")
    state = meta.get("train_state") or {}
    if not isinstance(old, dict):
        raise UserError(f"{where}: its state.json holds no config mapping; the checkpoint is "
                        f"damaged")
    step_in_epoch = state.get("step_in_epoch", 0) if isinstance(state, dict) else 0
    return decide(old, new_config, mid_epoch=bool(step_in_epoch), where=where)
