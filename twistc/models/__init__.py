"""Model definitions for the networks the compiler compresses."""

from twistc.models.resnet_cifar import (
    BasicBlock,
    PadShortcut,
    ResNetCifar,
    load_resnet32,
    resnet_cifar,
)
from twistc.models.resnet_imagenet import resnet18, resnet50

__all__ = ["BasicBlock", "PadShortcut", "ResNetCifar", "load_resnet32", "resnet_cifar", "resnet18", "resnet50"]
