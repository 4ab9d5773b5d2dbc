"""Data sets used to fine-tune and evaluate compressed models."""

from twistc.data.cifar10 import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CifarBatches,
    cifar10_batches,
    default_cache_dir,
    first_per_class,
    load_cifar10,
    random_crop_flip,
    validation_split,
)

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CifarBatches",
    "cifar10_batches",
    "default_cache_dir",
    "first_per_class",
    "load_cifar10",
    "random_crop_flip",
    "validation_split",
]
