"""MODEL.py for the twistc CLI: the reference CIFAR-10 ResNet-32 and its data.

Run from the project root, so the defaults find ``../shared/data``; override
with ``--set checkpoint=...``, ``--set root=...`` (a .tar.gz image folder, an
image-folder directory or a cifar-10-batches-py directory), ``--set split=val``
and so on.  Training uses the training set minus the 5,000-image validation
split, so tuning on ``split=val`` never touches the test set.
"""

from functools import lru_cache
from pathlib import Path

import torch

from twistc.data import CifarBatches, cifar10_batches, first_per_class, load_cifar10
from twistc.models import load_resnet32, resnet_cifar

DEFAULT_CKPT = "../shared/data/resnet32_cifar10.pt"
DEFAULT_ROOT = "../shared/data/cifar10-jpg.tar.gz"
EVAL_SPLITS = ("test", "val", "slice")
SLICE_PER_CLASS = 100


def model(checkpoint: str = DEFAULT_CKPT) -> torch.nn.Module:
    """The trained ResNet-32 in eval mode; ``checkpoint=""`` gives a freshly initialised one."""
    if not checkpoint:
        return resnet_cifar(32).eval()
    return load_resnet32(Path(checkpoint).resolve())


def example_inputs() -> tuple[torch.Tensor]:
    """One normalised-looking CIFAR image, batch 1."""
    return (torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)


def train_data(root: str = DEFAULT_ROOT, batch_size: int = 128, seed: int = 0) -> CifarBatches:
    """Augmented, shuffled batches of the training set minus the validation split.

    The same object is returned on every call, so each epoch (one ``iter()``)
    gets a fresh, seed-determined order and augmentation.
    """
    return _train_batches(str(Path(root).resolve()), batch_size, seed)


def eval_data(root: str = DEFAULT_ROOT, split: str = "test", batch_size: int = 500) -> CifarBatches:
    """Un-augmented batches of ``test``, ``val`` (held-out training images) or ``slice``
    (the first 100 test images of each class)."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"split must be one of {EVAL_SPLITS}, got {split!r}")
    return _eval_batches(str(Path(root).resolve()), split, batch_size)


@lru_cache(maxsize=4)
def _train_batches(root: str, batch_size: int, seed: int) -> CifarBatches:
    return cifar10_batches(root, "train", batch_size=batch_size, subset="train-minus-val",
                           augment=True, shuffle=True, seed=seed, drop_last=True)


@lru_cache(maxsize=4)
def _eval_batches(root: str, split: str, batch_size: int) -> CifarBatches:
    if split == "val":
        return cifar10_batches(root, "train", batch_size=batch_size, subset="val")
    if split == "slice":
        _, labels = load_cifar10(root, "test")
        return cifar10_batches(root, "test", batch_size=batch_size,
                               subset=first_per_class(labels, SLICE_PER_CLASS))
    return cifar10_batches(root, "test", batch_size=batch_size)
