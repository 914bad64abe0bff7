"""Pretrained weights for any model of the registry: torchvision's files, timm's, or a local file.

- ``model.pretrained=true``: torchvision's weights enum of the model (`get_model_weights(name)`),
  its DEFAULT member or ``model.weights=NAME`` (e.g. IMAGENET1K_V2). `prepare_weights` runs on the
  main process first (the engine calls it, like `prepare_data`): it downloads the file into torch's
  hub cache (``$TORCH_HOME/hub/checkpoints/<url basename>``, checking the hash in the file name) if
  it is not there yet. Then every rank's `load_pretrained` reads the cached file; nothing is
  downloaded there. timm models (``timm:NAME``): the file of timm's pretrained config in the
  Hugging Face cache (``$HF_HUB_CACHE``), downloaded the same way by the main process when the hub
  is reachable. Offline and missing: a UserError naming the file, where to put it and the URL.
- ``model.weights_path=FILE``: a local state_dict in the model's own format
  (``torch.save(state_dict)``, ``.pth``/``.pt``) or a ``.safetensors`` file with the same keys.

Files are read with ``torch.load(..., weights_only=True)`` (no arbitrary unpickling, no fallback).
The file's classifier head (the spec's ``head``, e.g. ``fc.``, ``classifier.6.``) is dropped and
the model keeps its own freshly initialised ``num_classes`` head, as are auxiliary heads the model
is built without and, with ``model.cifar_stem``, the first conv (its shape differs). ViT position
embeddings are resized to the model's input size (torchvision's own interpolation). Every other key
must be present with the right shape, else a UserError names the file and the mismatch, and nothing
is loaded. Distribution-agnostic.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from distrain.errors import UserError
from distrain.model_specs import (ModelSpec, spec_for, timm_pretrained_cfg, torchvision_names,
                                  torchvision_weights)

DOWNLOAD_TIMEOUT_S = 60  # per socket operation; a firewalled host fails instead of hanging
TIMM_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm looks for in a hub repository


def imagenet_weights(arch: str, weights: Optional[str] = None):
    """torchvision's weights enum member for ``arch``: ``weights`` by name, else the default."""
    return torchvision_weights(spec_for(arch), weights)


def hub_path(arch: str, weights: Optional[str] = None) -> Path:
    """Where torch.hub (and so torchvision) caches the file: ``<hub dir>/checkpoints/<url
    basename>``."""
    return (
        Path(torch.hub.get_dir())
        / "checkpoints"
        / os.path.basename(imagenet_weights(arch, weights).url)
    )


def _download(url: str, dst: Path, what: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    # What torch.hub.load_state_dict_from_url(check_hash=True) does, minus the load (every rank
    # loads later).
    match = torch.hub.HASH_REGEX.search(dst.name)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(
            url, str(dst), hash_prefix=match.group(1) if match else None, progress=os.isatty(2)
        )
    except Exception as e:  # noqa: BLE001 - offline, proxy, HTTP error, bad hash: the same advice
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"config key 'model.pretrained': {what} are not in the cache and could not be "
            f"downloaded ({why}); expected file '{dst}'. Download {url} and put it there "
            f"(set TORCH_HOME to use another cache), or point model.weights_path at a local copy"
        ) from None
    finally:
        socket.setdefaulttimeout(old_timeout)


def prepare_weights(cfg) -> None:
    """Main process, before any rank builds the model: the pretrained file into its cache."""
    m = cfg.model
    if not m.pretrained:
        return
    spec = spec_for(m.name)
    if spec.is_timm:
        _timm_fetch(spec, m.weights)
        return
    dst = hub_path(m.name, m.weights)
    if not dst.is_file():
        _download(
            imagenet_weights(m.name, m.weights).url,
            dst,
            f"{m.weights or 'the default'} weights for {m.name}",
        )


# -- timm ----------------------------------------------------------------------------------------


def _timm_repo(spec: ModelSpec, weights: Optional[str]) -> tuple[str, tuple[str, ...]]:
    cfg = timm_pretrained_cfg(spec, weights)
    repo = cfg.get("hf_hub_id")
    if not repo:
        raise UserError(
            f"config key 'model.pretrained': timm's {spec.arch} weights are not on the "
            f"Hugging Face hub; download them yourself and set model.weights_path"
        )
    files = (cfg["hf_hub_filename"],) if cfg.get("hf_hub_filename") else TIMM_FILES
    return repo, files


def timm_cached_file(spec: ModelSpec, weights: Optional[str]) -> Optional[Path]:
    from huggingface_hub import try_to_load_from_cache

    repo, files = _timm_repo(spec, weights)
    for f in files:
        hit = try_to_load_from_cache(repo, f)
        if isinstance(hit, str) and os.path.isfile(hit):
            return Path(hit)
    return None


def _timm_missing(spec: ModelSpec, weights: Optional[str], why: str = "") -> UserError:
    from huggingface_hub.constants import HF_HUB_CACHE

    repo, files = _timm_repo(spec, weights)
    downloaded = f" and could not be downloaded ({why})" if why else ""
    return UserError(
        f"config key 'model.pretrained': timm weights for {spec.arch} are not in the "
        f"Hugging Face cache '{HF_HUB_CACHE}'{downloaded}; expected {files[0]} of "
        f"https://huggingface.co/{repo} there (huggingface-cli download {repo} {files[0]}; "
        f"set HF_HUB_CACHE for another cache), or point model.weights_path at a local copy"
    )


def _timm_fetch(spec: ModelSpec, weights: Optional[str]) -> None:
    if timm_cached_file(spec, weights) is not None:
        return
    from huggingface_hub import hf_hub_download

    repo, files = _timm_repo(spec, weights)
    try:
        hf_hub_download(repo, files[0], etag_timeout=DOWNLOAD_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - offline, HF_HUB_OFFLINE, HTTP error: the same advice
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _timm_missing(spec, weights, why[:200]) from None


# -- reading and loading -------------------------------------------------------------------------


def weights_file(mcfg) -> Path:
    """The file `load_pretrained` reads: model.weights_path, else the cache entry."""
    if mcfg.weights_path:
        return Path(mcfg.weights_path)
    spec = spec_for(mcfg.name)
    if spec.is_timm:
        found = timm_cached_file(spec, mcfg.weights)
        if found is None:
            raise _timm_missing(spec, mcfg.weights)
        return found
    return hub_path(mcfg.name, mcfg.weights)


def read_state_dict(path: Path, key: str, url: str = "") -> dict:
    """A flat {name: tensor} dict from a torch.save file (weights_only) or a safetensors file."""
    if not path.is_file():
        if key == "model.weights_path":
            raise UserError(f"config key 'model.weights_path': file '{path}' does not exist")
        raise UserError(
            f"config key 'model.pretrained': pretrained weights file '{path}' is missing "
            f"(offline?); download {url} and put it there (or set TORCH_HOME to another "
            f"cache), or set model.weights_path"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, not a torch file, or holds non-tensors
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"config key '{key}': cannot read weights file '{path}' ({type(e).__name__}: "
            f"{why[:300]}); it must be a state_dict saved with torch.save(model.state_dict()) or a "
            f".safetensors file"
        ) from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict) and len(sd) <= 4:
        sd = sd["state_dict"]  # a common wrapper: {"state_dict": ..., "epoch": ...}
    if (
        not isinstance(sd, dict)
        or not sd
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())
    ):
        raise UserError(
            f"config key '{key}': weights file '{path}' does not hold a state_dict (a mapping of "
            f"names to tensors)"
        )
    from distrain.state_dicts import clean_state_dict

    # Also strips DDP's `module.` and torch.compile's `_orig_mod.` prefixes.
    return clean_state_dict(sd)


def _skipped(spec: ModelSpec, own: dict, cifar_stem: bool) -> tuple[str, ...]:
    """Key prefixes not taken from a file: the head, absent aux heads, a CIFAR stem's conv."""
    prefixes = [spec.head + "."] + [p + "." for p in spec.ignored_prefixes]
    if cifar_stem and spec.stem_conv:
        prefixes.append(spec.stem_conv + ".")
    return tuple(prefixes)


def _resize_position_embeddings(spec: ModelSpec, model: nn.Module, body: dict) -> dict:
    """torchvision ViT built for another input size: position embeddings interpolated."""
    key = "encoder.pos_embedding"
    if spec.family != "vision_transformer" or key not in body or not hasattr(model, "image_size"):
        return body
    own_shape = model.state_dict()[key].shape
    if body[key].shape == own_shape or body[key].ndim != 3 or body[key].shape[2] != own_shape[2]:
        return body
    from torchvision.models.vision_transformer import interpolate_embeddings

    return dict(interpolate_embeddings(model.image_size, model.patch_size, body))


def _mismatch_hint(name: str, keys: list[str]) -> str:
    """' (vgg16 vs vgg16_bn?)' when BatchNorm keys differ and the model has such a twin."""
    plain = name[:-3] if name.endswith("_bn") else name
    if not any("running_mean" in k for k in keys) or plain + "_bn" not in torchvision_names():
        return ""
    return f" ({plain} vs {plain}_bn?)"


def check_fits(model: nn.Module, sd: dict, mcfg, key: str, path: Path) -> dict:
    """The keys of ``sd`` that ``model`` takes (all but the skipped ones); UserError otherwise."""
    spec = spec_for(mcfg.name)
    own = model.state_dict()
    skip = _skipped(spec, own, getattr(mcfg, "cifar_stem", False))
    body = _resize_position_embeddings(
        spec, model, {k: v for k, v in sd.items() if not k.startswith(skip)}
    )
    expected = {k for k in own if not k.startswith(skip)}
    missing, unexpected = sorted(expected - body.keys()), sorted(body.keys() - expected)
    what = f"a {mcfg.name}" + (" with a CIFAR stem" if getattr(mcfg, "cifar_stem", False) else "")
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise UserError(
            f"config key '{key}': '{path}' does not fit {what}"
            f"{_mismatch_hint(mcfg.name, missing + unexpected)}: keys {'; '.join(parts)}"
        )
    wrong = [
        f"{k} {tuple(body[k].shape)} (model {tuple(own[k].shape)})"
        for k in sorted(body)
        if body[k].shape != own[k].shape
    ]
    if wrong:
        raise UserError(
            f"config key '{key}': '{path}' does not fit {what}: shape mismatch for {len(wrong)} "
            f"tensors, e.g. {'; '.join(wrong[:3])}"
        )
    head_w, own_w = sd.get(spec.head + ".weight"), own.get(spec.head + ".weight")
    if (
        head_w is not None
        and own_w is not None
        and (head_w.ndim != own_w.ndim or head_w.shape[1:] != own_w.shape[1:])
    ):
        raise UserError(
            f"config key '{key}': '{path}' has a classifier head ({spec.head}) of shape "
            f"{tuple(head_w.shape)}; {what} head takes {tuple(own_w.shape[1:])} inputs"
        )
    return body


def load_pretrained(model: nn.Module, mcfg) -> None:
    """Load everything but the classifier head from the configured file (strict otherwise)."""
    key = "model.weights_path" if mcfg.weights_path else "model.pretrained"
    spec = spec_for(mcfg.name)
    path = weights_file(mcfg)
    url = "" if mcfg.weights_path or spec.is_timm else imagenet_weights(mcfg.name, mcfg.weights).url
    body = check_fits(model, read_state_dict(path, key, url=url), mcfg, key, path)
    # The skipped keys (the fresh num_classes head, a CIFAR stem's conv) keep the model's own
    # values.
    result = model.load_state_dict(body, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) == set(model.state_dict()) - set(
        body
    )
