"""Model specs: what distrain knows about each model it can build, found from the model itself.

A `ModelSpec` exists for ``cifar10_quick``, for every classification model torchvision lists
(``torchvision.models.list_models(module=torchvision.models)``) and for ``timm:NAME`` when timm is
installed. Everything in a spec is derived generically, never from a per-model table:

- ``head``: the layer that produces the class logits, found by building the model on the meta device
  with a sentinel class count and taking the (last) Linear / Conv2d with that many outputs:
  ``fc`` (ResNet, RegNet, ...), ``classifier.6`` (VGG), ``classifier.1`` (EfficientNet; a Conv2d in
  SqueezeNet), ``heads.head`` (ViT), ``head`` (Swin). Pretrained files lose exactly these keys.
- ``head_group``: what stays trainable under ``model.freeze_features``: the head's parent when that
  is a classifier block below the root (VGG's whole ``classifier``, ViT's ``heads``), else the head
  (cifar10_quick: its two Linear layers, as the seed tutorial fine-tunes them).
- ``native_size``, ``weights``, normalisation and the eval resize: from the default weights' own
  transforms (torchvision) or the pretrained config (timm).

Invariants: a spec is a pure function of the installed torchvision / timm; building one allocates no
parameter memory (meta device); nothing here touches processes, devices or the network.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from distrain.errors import UserError

CIFAR_QUICK = "cifar10_quick"
TIMM_PREFIX = "timm:"
SENTINEL_CLASSES = 997  # a class count no hidden layer of any model has: its layer is the head
# The eval resize of models without weights of their own: shorter side to size x 1.14, then
# centre-crop.
DEFAULT_EVAL_RESIZE_RATIO = 1.14
# Builders whose default output is a tuple in train mode (auxiliary heads). Without aux heads the
# model returns plain logits; transform_input maps ImageNet-normalised inputs to what their ImageNet
# weights expect (torchvision sets it whenever it loads those weights itself).
_AUX_FREE = {
    "googlenet": {"aux_logits": False, "transform_input": True, "init_weights": True},
    "inception_v3": {"aux_logits": False, "transform_input": True, "init_weights": True},
}


@dataclass(frozen=True)
class Preprocessing:
    """How images reach the network: normalisation and (photos) the eval resize ratio."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_ratio: float  # shorter side = round(crop x ratio) before the centre crop


@dataclass(frozen=True)
class ModelSpec:
    name: str  # as written in model.name
    family: (
        str  # cifar10_quick, torchvision's module (resnet, vgg, vision_transformer, ...) or timm
    )
    head: str  # dotted path of the layer producing the logits
    head_group: tuple[str, ...]  # dotted paths of what freeze_features leaves trainable
    native_size: int  # the input side its default weights were trained at
    weights: tuple[str, ...] = ()  # torchvision enum member names / timm pretrained tags
    default_weights: Optional[str] = None
    size_kwarg: Optional[str] = None  # builder argument that fixes the input size (ViT: image_size)
    build_kwargs: dict = field(default_factory=dict)  # fixed builder arguments (no auxiliary heads)
    cifar_stem: bool = False  # has a ResNet stem (conv1 + maxpool) that model.cifar_stem can adapt
    stem_conv: str = ""  # the first conv, whose weights a CIFAR stem cannot take
    ignored_prefixes: tuple[
        str, ...
    ] = ()  # modules of the pretrained files the model is built without
    num_params: int = 0  # with a 1000-class head (ImageNet), as built here

    @property
    def is_timm(self) -> bool:
        return self.family == "timm"

    @property
    def arch(self) -> str:
        """The builder's own name (``timm:resnet18`` -> ``resnet18``)."""
        return self.name[len(TIMM_PREFIX) :] if self.is_timm else self.name

    def size_kwargs(self, input_size: Optional[int]) -> dict:
        """Builder arguments for an input side (ViT builds its position embeddings for one size)."""
        if not self.size_kwarg or input_size is None:
            return {}
        return {
            self.size_kwarg: (input_size, input_size) if self.family == "maxvit" else input_size
        }


# -- names ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def torchvision_names() -> tuple[str, ...]:
    import torchvision

    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def _require_timm(name: str):
    try:
        import timm
    except ImportError:
        raise UserError(
            f"config key 'model.name': '{name}' is a timm model but timm is not installed; "
            f"install the extra: pip install 'distrain[timm]'"
        ) from None
    return timm


def model_names(include_timm: bool = False) -> list[str]:
    """cifar10_quick and torchvision's classification models (and timm's, prefixed, on request)."""
    names = [CIFAR_QUICK, *torchvision_names()]
    if include_timm and timm_available():
        import timm

        names += [TIMM_PREFIX + n for n in timm.list_models()]
    return names


def _unknown(name: str) -> UserError:
    if name.startswith(TIMM_PREFIX):
        timm = _require_timm(name)
        pool, prefix = timm.list_models(), TIMM_PREFIX
        close = [
            prefix + c
            for c in difflib.get_close_matches(name[len(prefix) :], pool, n=3, cutoff=0.6)
        ]
    else:
        close = difflib.get_close_matches(name, model_names(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UserError(
        f"config key 'model.name': unknown model '{name}'{hint} "
        f"(`distrain models` lists them; timm models are timm:NAME)"
    )


# -- building on the meta device -----------------------------------------------------------------


@contextlib.contextmanager
def meta_parameters():
    """Every parameter and buffer registered inside goes to the meta device.

    ``torch.device("meta")`` alone breaks builders that compute with tensors (RegNet's widths); this
    moves each parameter as it is registered, so initialisers then run on meta tensors (no compute).
    """
    from torch.nn.modules import module as M

    def param(_mod, _name, p):
        return None if p is None or p.is_meta else nn.Parameter(p.to("meta"), p.requires_grad)

    def buffer(_mod, _name, b):
        return None if b is None or b.is_meta else b.to("meta")

    hooks = [
        M.register_module_parameter_registration_hook(param),
        M.register_module_buffer_registration_hook(buffer),
    ]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` without parameter memory: meta device, else meta registration hooks."""
    try:
        with torch.device("meta"):
            return build()
    except (NotImplementedError, RuntimeError):
        with meta_parameters():
            return build()


def find_head(model: nn.Module, num_classes: int) -> str:
    """Dotted path of the last Linear / Conv2d with ``num_classes`` outputs: the classifier."""
    found = [
        n
        for n, m in model.named_modules()
        if (isinstance(m, nn.Linear) and m.out_features == num_classes)
        or (isinstance(m, nn.Conv2d) and m.out_channels == num_classes)
    ]
    if not found:
        raise UserError(
            f"config key 'model.name': found no classifier layer with {num_classes} outputs in "
            f"{type(model).__name__}; it is not a classification model distrain can fine-tune"
        )
    return found[-1]


def imagenet_num_params(model: nn.Module, head: str) -> int:
    """Parameters of ``model`` (built with the sentinel class count) with a 1000-class head."""
    layer = model.get_submodule(head)
    per_class = sum(p.numel() for p in layer.parameters()) // SENTINEL_CLASSES
    return sum(p.numel() for p in model.parameters()) + (1000 - SENTINEL_CLASSES) * per_class


def head_group_of(model: nn.Module, head: str) -> tuple[str, ...]:
    """The head's classifier block below the root (VGG: ``classifier``), else the head alone."""
    parent = head.rpartition(".")[0]
    if not parent or "." in parent:
        return (head,)
    block = model.get_submodule(parent)
    # A classifier block holds only the head, dropout, activations, norms, pooling and flattening,
    # no feature blocks (EfficientNet's classifier is Dropout + Linear; a ResNet layer is not one).
    leaf_kinds = (nn.Linear, nn.Conv2d, nn.Dropout, nn.ReLU, nn.Hardswish, nn.GELU, nn.Tanh,
                  nn.Flatten, nn.AdaptiveAvgPool2d, nn.LayerNorm, nn.Identity)
    leaves = [m for m in block.modules() if not list(m.children())]
    ok = all(isinstance(m, leaf_kinds) or "Norm" in type(m).__name__ for m in leaves)
    return (parent,) if ok and isinstance(block, nn.Sequential) else (head,)


# -- specs ---------------------------------------------------------------------------------------


def spec_for(name: str) -> ModelSpec:
    """The spec of a model.name; UserError with the nearest names for an unknown one."""
    if not isinstance(name, str) or not name:
        raise UserError(
            "config key 'model.name' must be a model name (`distrain models` lists them)"
        )
    if name.startswith(TIMM_PREFIX):
        _require_timm(name)
    return _spec(name)


@functools.lru_cache(maxsize=None)
def _spec(name: str) -> ModelSpec:
    if name == CIFAR_QUICK:
        return ModelSpec(
            CIFAR_QUICK,
            CIFAR_QUICK,
            head="model.8",
            head_group=("model.7", "model.8"),
            native_size=32,
            num_params=145578,
        )
    if name.startswith(TIMM_PREFIX):
        return _timm_spec(name)
    if name in torchvision_names():
        return _torchvision_spec(name)
    raise _unknown(name)


def _torchvision_spec(name: str) -> ModelSpec:
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    family = builder.__module__.rsplit(".", 1)[-1]
    kwargs = dict(_AUX_FREE.get(name, {}))
    model = on_meta(lambda: builder(weights=None, num_classes=SENTINEL_CLASSES, **kwargs))
    ignored: tuple[str, ...] = ()
    if kwargs:  # the auxiliary heads of the default build, which the ImageNet files hold
        full = on_meta(
            lambda: builder(weights=None, num_classes=SENTINEL_CLASSES, init_weights=True)
        )
        kept = dict(model.named_children())
        ignored = tuple(n for n, _ in full.named_children() if n not in kept)
    head = find_head(model, SENTINEL_CLASSES)
    enum = torchvision.models.get_model_weights(name)
    default = enum.DEFAULT if len(enum) else None
    native = int(default.transforms().crop_size[0]) if default is not None else 224
    size_kwarg = {"vision_transformer": "image_size", "maxvit": "input_size"}.get(family)
    stem = isinstance(getattr(model, "conv1", None), nn.Conv2d) and isinstance(
        getattr(model, "maxpool", None), nn.MaxPool2d
    )
    return ModelSpec(
        name,
        family,
        head=head,
        head_group=head_group_of(model, head),
        native_size=native,
        weights=tuple(w.name for w in enum),
        default_weights=default.name if default else None,
        size_kwarg=size_kwarg,
        build_kwargs=kwargs,
        cifar_stem=stem,
        stem_conv="conv1" if stem else "",
        ignored_prefixes=ignored,
        num_params=imagenet_num_params(model, head),
    )


def _timm_spec(name: str) -> ModelSpec:
    import timm

    arch = name[len(TIMM_PREFIX) :]
    if not timm.is_model(arch):
        raise _unknown(name)
    model = on_meta(lambda: timm.create_model(arch, pretrained=False, num_classes=SENTINEL_CLASSES))
    head = find_head(model, SENTINEL_CLASSES)
    cfg = model.pretrained_cfg or {}
    native = int(cfg.get("input_size", (3, 224, 224))[-1])
    accepts_size = "img_size" in inspect.signature(type(model).__init__).parameters
    stem = isinstance(getattr(model, "conv1", None), nn.Conv2d) and isinstance(
        getattr(model, "maxpool", None), nn.MaxPool2d
    )
    tags = tuple(
        t.split(".", 1)[1]
        for t in timm.list_pretrained(arch)
        if "." in t and t.split(".")[0] == arch
    )
    return ModelSpec(
        name,
        "timm",
        head=head,
        head_group=head_group_of(model, head),
        native_size=native,
        weights=tags,
        default_weights=cfg.get("tag") or (tags[0] if tags else None),
        size_kwarg="img_size" if accepts_size and cfg.get("fixed_input_size") else None,
        cifar_stem=stem,
        stem_conv="conv1" if stem else "",
        num_params=imagenet_num_params(model, head),
    )


# -- weights and preprocessing -------------------------------------------------------------------


def torchvision_weights(spec: ModelSpec, weights: Optional[str]):
    """torchvision's weights enum member (``weights`` or the default); UserError if unknown."""
    import torchvision

    if not spec.weights:
        raise UserError(f"config key 'model.pretrained': {spec.name} has no pretrained weights")
    enum = torchvision.models.get_model_weights(spec.name)
    chosen = weights or spec.default_weights
    if chosen not in spec.weights:
        raise UserError(
            f"config key 'model.weights': {spec.name} has no weights '{chosen}'; "
            f"choose one of {', '.join(spec.weights)}"
        )
    return enum[chosen]


def timm_pretrained_cfg(spec: ModelSpec, weights: Optional[str]) -> dict:
    import timm

    tag = weights or spec.default_weights
    if spec.weights and tag not in spec.weights:
        raise UserError(
            f"config key 'model.weights': {spec.name} has no pretrained tag '{tag}'; "
            f"choose one of {', '.join(spec.weights)}"
        )
    full = f"{spec.arch}.{tag}" if tag else spec.arch
    cfg = timm.models.get_pretrained_cfg(full)
    if cfg is None:
        raise UserError(
            f"config key 'model.pretrained': timm has no pretrained config for '{full}'"
        )
    return cfg.to_dict()


def weights_preprocessing(spec: ModelSpec, weights: Optional[str]) -> Preprocessing:
    """Normalisation and eval resize ratio of a model's (default or chosen) pretrained weights."""
    if spec.is_timm:
        cfg = timm_pretrained_cfg(spec, weights)
        return Preprocessing(
            tuple(cfg["mean"]), tuple(cfg["std"]), 1.0 / float(cfg.get("crop_pct") or 0.875)
        )
    t = torchvision_weights(spec, weights).transforms()
    return Preprocessing(
        tuple(t.mean), tuple(t.std), float(t.resize_size[0]) / float(t.crop_size[0])
    )


# -- config rules --------------------------------------------------------------------------------


def validate_model_config(m) -> None:
    """The model rules of the config (config.validate calls this, on every rank)."""
    spec = spec_for(m.name)
    if spec.family == CIFAR_QUICK:
        if m.pretrained or m.weights_path or m.weights:
            raise UserError(
                "config key 'model.pretrained'/'model.weights_path': cifar10_quick has no "
                "pretrained weights"
            )
        if m.input_size != 32:
            raise UserError(
                "config key 'model.input_size' must be 32 for cifar10_quick (its 1024-wide layer "
                "fixes it)"
            )
    if m.weights is not None and not (m.pretrained or m.weights_path):
        raise UserError(
            "config key 'model.weights' picks pretrained weights: it needs model.pretrained=true "
            "(or model.weights_path, whose normalisation it then names)"
        )
    if m.pretrained or m.weights:
        if not spec.weights and not spec.is_timm:
            raise UserError(f"config key 'model.pretrained': {spec.name} has no pretrained weights")
        if spec.is_timm:
            timm_pretrained_cfg(spec, m.weights)
        else:
            torchvision_weights(spec, m.weights)
    if m.cifar_stem and not spec.cifar_stem:
        raise UserError(
            f"config key 'model.cifar_stem': {spec.name} has no ResNet stem (conv1 + maxpool) to "
            f"adapt; it is for resnet*, resnext* and wide_resnet*"
        )


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IN_MEMORY_DATASETS = ("cifar10", "synthetic")  # 32x32 images: no resize or crop for photos


def uses_weights(mcfg) -> bool:
    return bool(mcfg.pretrained or mcfg.weights_path)


def preprocessing(mcfg, data_name: str) -> tuple[tuple, tuple, int, int]:
    """(mean, std, resize, crop) of a model config on a dataset: what training, eval, export and
    predict use.

    Pretrained (hub or local file): the weights' own normalisation and resize/crop ratio. From
    scratch: CIFAR-10's statistics on the in-memory datasets, ImageNet's on photos, and the default
    1.14 ratio. In-memory datasets are never resized before the device upsampling: resize = crop =
    input_size.
    """
    spec = spec_for(mcfg.name)
    size = mcfg.input_size
    if uses_weights(mcfg) and spec.weights:
        pre = weights_preprocessing(spec, mcfg.weights)
        mean, std, ratio = pre.mean, pre.std, pre.resize_ratio
    elif uses_weights(mcfg) or data_name not in IN_MEMORY_DATASETS:
        mean, std, ratio = IMAGENET_MEAN, IMAGENET_STD, DEFAULT_EVAL_RESIZE_RATIO
    else:
        from distrain.data import cifar10

        mean, std, ratio = tuple(cifar10.MEAN), tuple(cifar10.STD), 1.0
    resize = size if data_name in IN_MEMORY_DATASETS else int(round(size * ratio))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std), resize, size
