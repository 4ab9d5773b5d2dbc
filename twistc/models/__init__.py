"""Model definitions for the networks the compiler compresses."""

from twistc.models.resnet_cifar import (
    BasicBlock,
    PadShortcut,
    ResNetCifar,
    load_resnet32,
    resnet_cifar,
)

__all__ = ["BasicBlock", "PadShortcut", "ResNetCifar", "load_resnet32", "resnet_cifar"]
