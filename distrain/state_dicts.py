"""State dicts as distrain stores them: plain names (no wrapper prefixes), contiguous CPU tensors.

`clean_state_dict` is the one place that strips DDP's ``module.`` and torch.compile's ``_orig_mod.``;
`non_finite` is the one test for NaN/inf weights, so no checkpoint, `best` or export of a diverged
model is ever written, and eval/predict refuse one.
"""

from __future__ import annotations

from typing import Optional

import torch


def clean_state_dict(sd: dict) -> dict:
    """Strip wrapper prefixes (DDP's `module.`, torch.compile's `_orig_mod.`), detach to contiguous CPU."""
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


def non_finite(sd: dict) -> Optional[str]:
    """The name of the first floating-point tensor holding NaN or inf, None when all are finite."""
    for k, v in sd.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return k
    return None
