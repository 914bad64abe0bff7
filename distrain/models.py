"""Model registry: `build_model(name, num_classes)` for the seed's CIFAR10-quick net, every
torchvision classification model and (with the timm extra) ``timm:NAME``.

What each model is (head, trainable head group, native size, weights) lives in its `ModelSpec`
(model_specs.py); this module builds models from specs and splits their parameters.

Invariants: models know nothing about distribution or devices. A built model carries its spec name
(``distrain_spec``) so that `backbone_and_head` works on it alone. Exported weights load strictly
into what this module builds and, without a CIFAR stem, into ``torchvision.models.get_model(name,
num_classes=N, **builder_kwargs(...))`` (the builder arguments are in model.json).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from distrain.errors import UserError
from distrain.model_specs import (
    CIFAR_QUICK,
    ModelSpec,
    model_names,
    on_meta,
    spec_for,
    validate_model_config,
)

SPEC_ATTR = "distrain_spec"


class Cifar10Quick(nn.Module):
    """The seed tutorial's CIFAR10-quick network, layer for layer (no activations between)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(3, 32, 5, padding=2),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 5, padding=2),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(1024, 64),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def builder_kwargs(spec: ModelSpec, input_size: Optional[int] = None) -> dict:
    """Builder arguments besides num_classes: fixed ones, and the input size if built in."""
    return {**spec.build_kwargs, **spec.size_kwargs(input_size)}


def apply_cifar_stem(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """The CIFAR ResNet stem: 3x3 stride-1 first conv, no max-pool (32x32 inputs keep detail)."""
    from distrain.errors import UserError

    if not spec.cifar_stem:
        raise UserError(
            f"config key 'model.cifar_stem': {spec.name} has no ResNet stem (conv1 + maxpool) to "
            f"adapt; use it with resnet*, resnext* or wide_resnet*, or set model.input_size instead"
        )
    old = model.get_submodule(spec.stem_conv)
    model.conv1 = nn.Conv2d(
        old.in_channels, old.out_channels, 3, stride=1, padding=1, bias=old.bias is not None
    )
    # Initialised as torchvision's ResNet initialises its convolutions.
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def build_model(
    name: str, num_classes: int = 10, cifar_stem: bool = False, input_size: Optional[int] = None
) -> nn.Module:
    """A freshly initialised model with a ``num_classes`` head (UserError naming close names if
    unknown).

    ``input_size`` matters only to models that build it in (ViT's position embeddings); others take
    any size their pooling allows.
    """
    spec = spec_for(name)
    if spec.family == CIFAR_QUICK:
        model: nn.Module = Cifar10Quick(num_classes)
    elif spec.is_timm:
        import timm

        kw = {"img_size": input_size} if spec.size_kwarg and input_size else {}
        model = timm.create_model(spec.arch, pretrained=False, num_classes=num_classes, **kw)
    else:
        import torchvision

        model = torchvision.models.get_model(
            name, weights=None, num_classes=num_classes, **builder_kwargs(spec, input_size)
        )
    if cifar_stem:
        model = apply_cifar_stem(model, spec)
    # A plain attribute: not a parameter or buffer, so not in the state_dict.
    object.__setattr__(model, SPEC_ATTR, spec.name)
    return model


def build_from_config(mcfg) -> nn.Module:
    """`build_model` with a ModelConfig's name, classes, stem and input size."""
    return build_model(
        mcfg.name,
        num_classes=mcfg.num_classes,
        cifar_stem=mcfg.cifar_stem,
        input_size=mcfg.input_size,
    )


def model_spec(model: nn.Module) -> ModelSpec:
    name = getattr(model, SPEC_ATTR, None)
    if name is None:  # built elsewhere: a Cifar10Quick, or guess nothing
        if isinstance(model, Cifar10Quick):
            return spec_for(CIFAR_QUICK)
        raise ValueError(f"{type(model).__name__} was not built by distrain.models.build_model")
    return spec_for(name)


def backbone_and_head(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split parameters into feature extractor and classifier (freezing, lr multipliers)."""
    spec = model_spec(model)
    head = [p for path in spec.head_group for p in model.get_submodule(path).parameters()]
    ids = {id(p) for p in head}
    return [p for p in model.parameters() if id(p) not in ids], head


def convert_sync_batchnorm(model: nn.Module, world_size: int, device_type: str = "cuda",
                           reduce_sum=None) -> nn.Module:
    """model.sync_bn: BatchNorm statistics over all ranks' micro-batches.

    Only with ``world_size > 1`` (one process keeps plain BatchNorm, which computes the same). GPUs:
    torch's SyncBatchNorm. CPU processes, where it has no kernels:
    `cross_rank_bn.CrossRankBatchNorm` with ``reduce_sum`` (a callable summing a tensor over all
    ranks, from the distribution layer).
    """
    if world_size <= 1:
        return model
    if device_type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if reduce_sum is None:


        raise UserError("config key 'model.sync_bn': several CPU processes need an all-reduce for "
                        "their BatchNorm statistics, and none was given")
    from distrain import cross_rank_bn

    return cross_rank_bn.convert(model, reduce_sum)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def check_model_config(m) -> None:
    """Every model-specific rule of a ModelConfig (UserError naming the key): the spec's, then
    whether the network takes ``model.input_size`` inputs at all."""
    validate_model_config(m)
    spec = spec_for(m.name)
    if spec.family != CIFAR_QUICK:
        check_input_size(spec.name, m.input_size, m.cifar_stem)


@functools.lru_cache(maxsize=64)
def check_input_size(name: str, size: int, cifar_stem: bool = False) -> None:
    """UserError when the model cannot take ``size`` x ``size`` inputs (a meta forward)."""
    try:
        model = on_meta(
            lambda: build_model(name, num_classes=2, cifar_stem=cifar_stem, input_size=size)
        )
        with torch.no_grad():
            model.eval()(torch.empty(1, 3, size, size, device="meta"))
    except NotImplementedError:
        return  # an operator without a meta kernel: nothing learned, the real run will tell
    except (RuntimeError, ValueError, AssertionError, IndexError) as e:
        if "meta" in str(e).lower():
            return
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(
            f"config key 'model.input_size': {name} cannot take {size}x{size} inputs ({why}); "
            f"its native size is {spec_for(name).native_size}"
        ) from None
