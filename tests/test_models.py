"""Model registry: the seed's CIFAR10-quick layer for layer, VGG16 with a new head, strict loading."""

import pytest
import torch
from torch import nn

from distrain.errors import UserError
from distrain.models import backbone_and_head, build_model, model_names


def test_cifar10_quick_is_the_seed_net():
    m = build_model("cifar10_quick", num_classes=10)
    layers = list(m.model)
    kinds = [type(l).__name__ for l in layers]
    assert kinds == ["Conv2d", "MaxPool2d", "Conv2d", "MaxPool2d", "Conv2d", "MaxPool2d", "Flatten", "Linear", "Linear"]
    convs = [l for l in layers if isinstance(l, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (3, 32, (5, 5), (2, 2)), (32, 32, (5, 5), (2, 2)), (32, 64, (5, 5), (2, 2))]
    assert all(l.kernel_size == 2 for l in layers if isinstance(l, nn.MaxPool2d))
    lin = [l for l in layers if isinstance(l, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lin] == [(1024, 64), (64, 10)]
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_num_classes():
    assert build_model("cifar10_quick", num_classes=7)(torch.zeros(1, 3, 32, 32)).shape == (1, 7)


def test_vgg16_head_and_torchvision_compat():
    import torchvision

    m = build_model("vgg16", num_classes=10)
    assert isinstance(m.classifier[6], nn.Linear) and m.classifier[6].out_features == 10
    ref = torchvision.models.vgg16(num_classes=10)
    ref.load_state_dict(m.state_dict(), strict=True)  # the export promise
    assert m(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_vgg16_bn_registered():
    assert "vgg16_bn" in model_names()
    assert build_model("vgg16_bn", num_classes=3).classifier[6].out_features == 3


def test_unknown_model():
    with pytest.raises(UserError, match="unknown model 'resnet'"):
        build_model("resnet")


def test_backbone_and_head_partition():
    for name in ("cifar10_quick", "vgg16"):
        m = build_model(name)
        bb, head = backbone_and_head(m)
        assert len(bb) + len(head) == len(list(m.parameters()))
        assert {id(p) for p in bb}.isdisjoint({id(p) for p in head}) and head
