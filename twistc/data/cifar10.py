"""CIFAR-10 loading, splitting and batching.

The compiler fine-tunes and evaluates compressed models on CIFAR-10, so this
module turns whatever copy of the data set is at hand (the official pickle
batches, an image-folder tree, or a ``.tar.gz`` of such a tree) into plain
uint8 arrays, decoded once and cached as ``.npz``.  Batches are produced from
those arrays with torch ops (normalisation and pad-crop-flip augmentation done
per batch, vectorised), seeded so that training runs are reproducible.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)

SPLITS = ("train", "test")
IMAGE_SIZE = 32
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
PICKLE_DIR = "cifar-10-batches-py"
PICKLE_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
_CACHE_VERSION = 1

PathLike = str | os.PathLike


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------

def load_cifar10(
    source: PathLike,
    split: str,
    cache_dir: PathLike | None = None,
    use_cache: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of CIFAR-10 as ``(images uint8 [N,32,32,3], labels int64 [N])``.

    ``source`` is a pickle-batch directory (or its parent), an image-folder
    directory, or a ``.tar.gz``/``.tar`` of an image folder.  Decoded arrays are
    cached in ``cache_dir`` (default: ``$TWISTC_CACHE/cifar10``, else
    ``~/.cache/twistc/cifar10``) keyed by path, size, mtime and split.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(
            f"CIFAR-10 source {str(path)!r} not found; expected a cifar-10-batches-py "
            "directory, an image-folder directory (train/<class>/*.jpg) or a .tar.gz of one")

    cache_file = _cache_path(path, split, cache_dir) if use_cache else None
    if cache_file is not None and cache_file.is_file():
        logger.debug("CIFAR-10 %s: cache hit %s", split, cache_file)
        with np.load(cache_file) as npz:
            return npz["images"], npz["labels"]

    start = time.perf_counter()
    images, labels = _load_uncached(path, split)
    logger.info("CIFAR-10 %s: decoded %d images from %s in %.1f s",
                split, len(images), path, time.perf_counter() - start)
    if cache_file is not None:
        _write_cache(cache_file, images, labels)
    return images, labels


def _load_uncached(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Dispatch on the kind of source."""
    if path.is_file():
        if path.name.endswith((".tar.gz", ".tgz", ".tar")):
            return _load_image_tar(path, split)
        raise ValueError(f"unrecognised CIFAR-10 file {str(path)!r}; expected a .tar.gz of an "
                         "image folder (train/<class>/*.jpg, test/<class>/*.jpg)")
    pickle_dir = _find_pickle_dir(path)
    if pickle_dir is not None:
        return _load_pickles(pickle_dir, split)
    if (path / split).is_dir():
        return _load_image_dir(path / split)
    raise ValueError(
        f"unrecognised CIFAR-10 directory {str(path)!r}; expected data_batch_1..5/test_batch, "
        f"a {PICKLE_DIR}/ subfolder, or {split}/<class>/ image folders")


def _find_pickle_dir(path: Path) -> Path | None:
    """Return the folder holding the official pickle batches, if ``path`` is or contains it."""
    for candidate in (path, path / PICKLE_DIR):
        if (candidate / "data_batch_1").is_file() and (candidate / "test_batch").is_file():
            return candidate
    return None


def _load_pickles(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read the official python-pickle batches (rows are 3072 bytes, channel-major)."""
    images, labels = [], []
    for name in PICKLE_FILES[split]:
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        images.append(data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def _load_image_dir(split_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``<split>/<class>/<file>`` from disk."""
    entries = [
        (cls_dir.name, file.name, file)
        for cls_dir in split_dir.iterdir() if cls_dir.is_dir()
        for file in cls_dir.iterdir() if _is_image_name(file.name)
    ]
    return _decode_entries(entries, lambda file: file.read_bytes(), str(split_dir))


def _load_image_tar(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read ``<split>/<class>/<file>`` members straight out of a tar archive."""
    entries = []
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            parts = member.name.removeprefix("./").split("/") if member.isfile() else []
            if len(parts) == 3 and parts[0] == split and _is_image_name(parts[2]):
                entries.append((parts[1], parts[2], tar.extractfile(member).read()))
    return _decode_entries(entries, lambda data: data, f"{path}:{split}/")


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _decode_entries(entries: list, read, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``(class, file name, payload)`` entries in class-major, file-name order."""
    if not entries:
        raise ValueError(f"no images found under {where!r}; expected <class>/*.jpg or *.png files")
    classes = sorted({cls for cls, _, _ in entries})
    label_of = {cls: i for i, cls in enumerate(classes)}
    entries.sort(key=lambda e: (label_of[e[0]], e[1]))
    images = np.empty((len(entries), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    labels = np.empty(len(entries), dtype=np.int64)
    for i, (cls, name, payload) in enumerate(entries):
        image = _decode_image(read(payload))
        if image.shape != images.shape[1:]:
            raise ValueError(f"{cls}/{name} in {where!r} decodes to {image.shape}, "
                             f"expected ({IMAGE_SIZE}, {IMAGE_SIZE}, 3)")
        images[i] = image
        labels[i] = label_of[cls]
    return images, labels


def _decode_image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


# --------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """``$TWISTC_CACHE/cifar10`` if the variable is set, else ``~/.cache/twistc/cifar10``."""
    root = os.environ.get("TWISTC_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "twistc"
    return base / "cifar10"


def _cache_path(path: Path, split: str, cache_dir: PathLike | None) -> Path:
    st = path.stat()
    key = f"v{_CACHE_VERSION}|{path}|{st.st_size}|{st.st_mtime_ns}|{split}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return folder / f"{split}-{digest}.npz"


def _write_cache(cache_file: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write the arrays atomically; a failure only costs a re-decode next time."""
    tmp_name = None
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache_file.parent, suffix=".tmp",
                                         delete=False) as tmp:
            tmp_name = tmp.name
            np.savez(tmp, images=images, labels=labels)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, cache_file)
        logger.debug("CIFAR-10 cache written to %s", cache_file)
    except OSError as exc:
        logger.warning("could not write CIFAR-10 cache %s: %s", cache_file, exc)
        if tmp_name is not None and os.path.exists(tmp_name):
            os.unlink(tmp_name)


# --------------------------------------------------------------------------
# Index helpers
# --------------------------------------------------------------------------

def validation_split(n_train: int, n_val: int = 5000,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n_train)`` into sorted ``(train_idx, val_idx)`` with a seeded permutation.

    Tuning uses the held-out part of the training set so the test set stays untouched.
    """
    if not 0 < n_val < n_train:
        raise ValueError(f"n_val must be in (0, {n_train}), got {n_val}")
    perm = np.random.default_rng(seed).permutation(n_train)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


def first_per_class(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of the first ``n`` items of each class, in array order.

    Classes with fewer than ``n`` items contribute all of theirs.
    """
    labels = np.asarray(labels)
    picked = [np.flatnonzero(labels == c)[:n] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked)).astype(np.int64) if picked else np.empty(0, np.int64)


# --------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------

def random_crop_flip(x: torch.Tensor, generator: torch.Generator | None = None,
                     padding: int = 4) -> torch.Tensor:
    """Zero-pad by ``padding``, take a random same-size crop and flip half the batch.

    Works on a whole NCHW batch at once: the crop offsets and the flip are folded
    into one gather over the padded tensor.
    """
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    top = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator)
    flip = torch.rand(b, 1, generator=generator) < 0.5
    rows = top + torch.arange(h)
    cols_ = torch.arange(w)
    cols = left + torch.where(flip, cols_.flip(0), cols_)
    batch = torch.arange(b)[:, None, None, None]
    chan = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


class CifarBatches:
    """Re-iterable batches ``(x float32 NCHW normalised, y int64)`` over uint8 arrays.

    Each ``iter()`` is one epoch; its order and augmentation come from a generator
    seeded with ``(seed, epoch)``, and the epoch counter advances after each pass,
    so a run is reproducible from its seed.  Padding for augmentation is applied to
    raw pixels (black), before normalisation.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int = 128,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        channels_last: bool = False,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        self.channels_last = channels_last
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` produce epoch ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        self.epoch += 1
        n = len(self.labels)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self._make_batch(idx, generator), self.labels[idx]

    def _make_batch(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = self.images[idx].permute(0, 3, 1, 2)
        if self.augment:
            x = random_crop_flip(x, generator)
        x = (x.float() - self.mean) / self.std
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)


def cifar10_batches(
    source: PathLike,
    split: str,
    batch_size: int = 128,
    augment: bool | None = None,
    shuffle: bool | None = None,
    subset: str | Sequence[int] | np.ndarray | None = None,
    seed: int = 0,
    drop_last: bool = False,
    channels_last: bool = False,
    n_val: int = 5000,
    val_seed: int = 0,
    cache_dir: PathLike | None = None,
) -> CifarBatches:
    """Load a split and wrap it in :class:`CifarBatches`.

    ``subset`` is ``None`` (all), ``"val"`` or ``"train-minus-val"`` (the
    :func:`validation_split` of the training set, ``n_val``/``val_seed``), or an
    index array.  ``augment``/``shuffle`` default to on for training data, i.e.
    the train split unless ``subset == "val"``.
    """
    images, labels = load_cifar10(source, split, cache_dir=cache_dir)
    idx = _subset_indices(subset, split, len(labels), n_val, val_seed)
    if idx is not None:
        images, labels = images[idx], labels[idx]
    training = split == "train" and not (isinstance(subset, str) and subset == "val")
    return CifarBatches(
        images, labels, batch_size=batch_size,
        shuffle=training if shuffle is None else shuffle,
        augment=training if augment is None else augment,
        seed=seed, drop_last=drop_last, channels_last=channels_last)


def _subset_indices(subset, split: str, n: int, n_val: int, val_seed: int) -> np.ndarray | None:
    if subset is None:
        return None
    if isinstance(subset, str):
        if split != "train" or subset not in ("val", "train-minus-val"):
            raise ValueError(f"subset {subset!r} with split {split!r}: expected 'val' or "
                             "'train-minus-val' with split 'train', or an index array")
        train_idx, val_idx = validation_split(n, n_val, val_seed)
        return val_idx if subset == "val" else train_idx
    return np.asarray(subset, dtype=np.int64)
