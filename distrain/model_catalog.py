"""`distrain models [--pretrained] [FILTER]`: the model names, parameter counts, native sizes and
weights.

Every row comes from the model's spec (model_specs.py), whose model is built on the meta device, so
listing all of torchvision allocates no parameter memory. timm's ~1,400 architectures are listed
only when FILTER starts with ``timm:`` (each needs its own meta build).
"""

from __future__ import annotations

import fnmatch
from typing import Optional

from distrain.errors import UserError
from distrain.model_specs import TIMM_PREFIX, ModelSpec, model_names, spec_for, timm_available


def _matches(name: str, pattern: Optional[str]) -> bool:
    if not pattern:
        return True
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern.lower() in name.lower()


def catalog(pattern: Optional[str] = None, pretrained_only: bool = False) -> list[ModelSpec]:
    """Specs of the names matching ``pattern`` (substring or glob), optionally pretrained only."""
    timm_wanted = bool(pattern) and pattern.startswith(TIMM_PREFIX)
    if timm_wanted and not timm_available():
        raise UserError("timm is not installed; install the extra: pip install 'distrain[timm]'")
    names = [
        n
        for n in model_names(include_timm=timm_wanted)
        if n.startswith(TIMM_PREFIX) == timm_wanted and _matches(n, pattern)
    ]
    specs = [spec_for(n) for n in names]
    return [s for s in specs if s.weights or not pretrained_only]


def row(spec: ModelSpec) -> dict:
    return {
        "name": spec.name,
        "family": spec.family,
        "params": spec.num_params,
        "native_size": spec.native_size,
        "head": spec.head,
        "weights": list(spec.weights),
        "default_weights": spec.default_weights,
        "cifar_stem": spec.cifar_stem,
    }


def format_table(specs: list[ModelSpec]) -> str:
    """One line per model: name, parameters, native size, weights (the default starred)."""
    lines = [f"{'name':<26} {'params':>8} {'size':>5}  weights (* default)"]
    for s in specs:
        weights = ", ".join(
            w + ("*" if w == s.default_weights and len(s.weights) > 1 else "") for w in s.weights
        )
        lines.append(
            f"{s.name:<26} {s.num_params / 1e6:>7.1f}M {s.native_size:>5}  {weights or '-'}"
        )
    return "\n".join(lines)
