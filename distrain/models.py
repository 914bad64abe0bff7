"""Model registry: `build_model(name, num_classes)` for the seed's CIFAR10-quick net and torchvision's VGG16.

Models know nothing about distribution or devices. Exported weights load strictly into what this module
builds (and, for VGG, into torchvision's own constructor).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from distrain.errors import UserError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def deco(fn):
        _REGISTRY[name] = fn
        return fn

    return deco


def model_names() -> list[str]:
    return sorted(_REGISTRY)


class Cifar10Quick(nn.Module):
    """The seed tutorial's CIFAR10-quick network, layer for layer (it has no activations between layers)."""

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


@register("cifar10_quick")
def cifar10_quick(num_classes: int = 10) -> nn.Module:
    return Cifar10Quick(num_classes)


def _vgg(arch: str, num_classes: int) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None)
    # Replace the 1000-class ImageNet head; keep torchvision's own init for the new layer.
    old = model.classifier[6]
    model.classifier[6] = nn.Linear(old.in_features, num_classes)
    return model


@register("vgg16")
def vgg16(num_classes: int = 10) -> nn.Module:
    return _vgg("vgg16", num_classes)


@register("vgg16_bn")
def vgg16_bn(num_classes: int = 10) -> nn.Module:
    return _vgg("vgg16_bn", num_classes)


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """A freshly initialised model from the registry."""
    if name not in _REGISTRY:
        raise UserError(f"unknown model '{name}'; choose one of {', '.join(model_names())}")
    return _REGISTRY[name](num_classes=num_classes)


def backbone_and_head(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split parameters into the feature extractor and the classifier, for freezing and lr multipliers."""
    if hasattr(model, "features") and hasattr(model, "classifier"):
        return list(model.features.parameters()), list(model.classifier.parameters())
    if isinstance(model, Cifar10Quick):
        layers = list(model.model)
        head = [p for m in layers[-2:] for p in m.parameters()]
        ids = {id(p) for p in head}
        return [p for p in model.parameters() if id(p) not in ids], head
    return [], list(model.parameters())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
