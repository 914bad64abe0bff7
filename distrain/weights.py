"""Pretrained weights for the VGG models: torchvision's ImageNet files or a local file in the same format.

- ``model.pretrained=true``: torchvision's weights API (``VGG16_Weights.IMAGENET1K_V1`` /
  ``VGG16_BN_Weights.IMAGENET1K_V1``). `prepare_weights` runs on the main process first (the engine calls
  it, like `prepare_data`): it downloads the file into torch's hub cache (``$TORCH_HOME/hub/checkpoints/``,
  checking the hash in the file name) if it is not there yet. Then every rank's `load_pretrained` reads
  the cached file; nothing is downloaded there. Offline, put the file at the path the error names.
- ``model.weights_path=FILE``: a local state_dict in torchvision's format (``torch.save(model.state_dict())``,
  ``.pth``/``.pt``) or a ``.safetensors`` file with the same keys.

Files are read with ``torch.load(..., weights_only=True)`` (no arbitrary unpickling, no fallback). The
file's classifier head (``classifier.6``, 1000 ImageNet classes) is dropped and the model keeps its own
freshly initialised ``num_classes`` head; every other key must be present with the right shape, else a
UserError names the file and the mismatch. Distribution-agnostic: ranks and processes are the engine's job.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
from torch import nn

from distrain.errors import UserError

HEAD_PREFIX = "classifier.6."  # the last Linear of torchvision's VGG classifier
DOWNLOAD_TIMEOUT_S = 60  # per socket operation; a firewalled host fails instead of hanging


def imagenet_weights(arch: str):
    """torchvision's ImageNet weights enum member for ``arch`` (vgg16, vgg16_bn)."""
    import torchvision.models as tvm

    table = {"vgg16": tvm.VGG16_Weights.IMAGENET1K_V1, "vgg16_bn": tvm.VGG16_BN_Weights.IMAGENET1K_V1}
    if arch not in table:
        raise UserError(f"config key 'model.pretrained': no ImageNet weights for model '{arch}' "
                        f"(available for {', '.join(sorted(table))})")
    return table[arch]


def hub_path(arch: str) -> Path:
    """Where torch.hub (and so torchvision) caches the ImageNet file: ``<hub dir>/checkpoints/<url basename>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(imagenet_weights(arch).url)


def prepare_weights(cfg) -> None:
    """Main process, before any rank builds the model: make sure the ImageNet file is in the hub cache."""
    m = cfg.model
    if not m.pretrained:
        return
    dst = hub_path(m.name)
    if dst.is_file():
        return
    url = imagenet_weights(m.name).url
    dst.parent.mkdir(parents=True, exist_ok=True)
    # What torch.hub.load_state_dict_from_url(check_hash=True) does, minus the load (every rank loads later).
    match = torch.hub.HASH_REGEX.search(dst.name)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(url, str(dst), hash_prefix=match.group(1) if match else None,
                                       progress=os.isatty(2))
    except Exception as e:  # noqa: BLE001 - offline, proxy, HTTP error, hash mismatch: all the same advice
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"config key 'model.pretrained': ImageNet weights for {m.name} are not in the cache and could not be "
            f"downloaded ({why}); expected file '{dst}'. Download {url} and put it there (set TORCH_HOME to use "
            f"another cache), or point model.weights_path at a local copy"
        ) from None
    finally:
        socket.setdefaulttimeout(old_timeout)


def weights_file(mcfg) -> Path:
    """The file `load_pretrained` reads: model.weights_path, else the hub cache entry."""
    return Path(mcfg.weights_path) if mcfg.weights_path else hub_path(mcfg.name)


def read_state_dict(path: Path, key: str, url: str = "") -> dict:
    """A flat {name: tensor} dict from a torchvision-format file (weights_only) or a safetensors file."""
    if not path.is_file():
        if key == "model.weights_path":
            raise UserError(f"config key 'model.weights_path': file '{path}' does not exist")
        raise UserError(
            f"config key 'model.pretrained': ImageNet weights file '{path}' is missing (offline?); download "
            f"{url} and put it there (or set TORCH_HOME to another cache), or set model.weights_path"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, not a torch file, or holds objects beyond tensors
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"config key '{key}': cannot read weights file '{path}' ({type(e).__name__}: {why[:300]}); "
                        f"it must be a state_dict saved with torch.save(model.state_dict()) or a .safetensors file") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict) and len(sd) <= 4:
        sd = sd["state_dict"]  # a common wrapper: {"state_dict": ..., "epoch": ...}
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise UserError(f"config key '{key}': weights file '{path}' does not hold a state_dict (a mapping of names to tensors)")
    from distrain.state_dicts import clean_state_dict

    return clean_state_dict(sd)  # also strips DDP's `module.` and torch.compile's `_orig_mod.` prefixes


def load_pretrained(model: nn.Module, mcfg) -> None:
    """Load everything but the classifier head from the configured file into ``model`` (strict otherwise)."""
    key = "model.weights_path" if mcfg.weights_path else "model.pretrained"
    path = weights_file(mcfg)
    sd = read_state_dict(path, key, url="" if mcfg.weights_path else imagenet_weights(mcfg.name).url)
    own = model.state_dict()
    body = {k: v for k, v in sd.items() if not k.startswith(HEAD_PREFIX)}
    expected = {k for k in own if not k.startswith(HEAD_PREFIX)}
    missing, unexpected = sorted(expected - body.keys()), sorted(body.keys() - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        hint = " (vgg16 vs vgg16_bn?)" if any("running_mean" in k for k in missing + unexpected) else ""
        raise UserError(f"config key '{key}': '{path}' does not fit a torchvision {mcfg.name}{hint}: keys "
                        f"{'; '.join(parts)}")
    wrong = [f"{k} {tuple(body[k].shape)} (model {tuple(own[k].shape)})" for k in sorted(body)
             if body[k].shape != own[k].shape]
    if wrong:
        raise UserError(f"config key '{key}': '{path}' does not fit a torchvision {mcfg.name}: shape mismatch "
                        f"for {len(wrong)} tensors, e.g. {'; '.join(wrong[:3])}")
    head_w = sd.get(HEAD_PREFIX + "weight")
    if head_w is not None and (head_w.ndim != 2 or head_w.shape[1] != own[HEAD_PREFIX + "weight"].shape[1]):
        raise UserError(f"config key '{key}': '{path}' has a classifier head of shape {tuple(head_w.shape)}; "
                        f"a torchvision {mcfg.name} head takes {own[HEAD_PREFIX + 'weight'].shape[1]} inputs")
    # Head keys are expected missing: the model's own freshly initialised num_classes head stays.
    result = model.load_state_dict(body, strict=False)
    assert set(result.missing_keys) == {k for k in own if k.startswith(HEAD_PREFIX)} and not result.unexpected_keys
