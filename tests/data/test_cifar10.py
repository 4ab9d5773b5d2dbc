"""Tests for the CIFAR-10 loader, splits, augmentation and batching, on tiny generated data."""

import io
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from twistc.data import (
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
from twistc.data import cifar10 as cifar10_module

# Class folder -> file names, deliberately listed out of sorted order.
TREE = {"train": {"cat": ["0002", "0000", "0001"], "ant": ["0001", "0000"]},
        "test": {"cat": ["0000"], "ant": ["0001", "0000"]}}


def _pixel_value(split: str, cls: str, name: str) -> int:
    return {"train": 0, "test": 100}[split] + {"ant": 0, "cat": 50}[cls] + int(name) * 10


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_tree(root):
    for split, classes in TREE.items():
        for cls, names in classes.items():
            (root / split / cls).mkdir(parents=True)
            for name in names:
                (root / split / cls / f"{name}.png").write_bytes(_png(_pixel_value(split, cls, name)))
    return root


def _write_tar(path, tree_root):
    with tarfile.open(path, "w:gz") as tar:
        for file in sorted(tree_root.rglob("*.png"), reverse=True):
            tar.add(file, arcname=str(file.relative_to(tree_root)))
    return path


def _expected(split):
    classes = sorted(TREE[split])
    pairs = [(label, _pixel_value(split, cls, name))
             for label, cls in enumerate(classes) for name in sorted(TREE[split][cls])]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


@pytest.fixture
def tree(tmp_path):
    return _write_tree(tmp_path / "tree")


@pytest.fixture
def archive(tmp_path, tree):
    return _write_tar(tmp_path / "tiny.tar.gz", tree)


@pytest.mark.parametrize("split", ["train", "test"])
def test_tarball_labels_order_shape(archive, tmp_path, split):
    images, labels = load_cifar10(archive, split, cache_dir=tmp_path / "cache")
    want_labels, want_values = _expected(split)
    assert images.dtype == np.uint8 and images.shape == (len(want_labels), 32, 32, 3)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_array_equal(images[:, 0, 0, 0], want_values)


def test_image_dir_matches_tarball(archive, tree, tmp_path):
    from_dir = load_cifar10(tree, "train", use_cache=False)
    from_tar = load_cifar10(archive, "train", use_cache=False)
    for a, b in zip(from_dir, from_tar):
        np.testing.assert_array_equal(a, b)


def test_jpeg_decodes_to_rgb(tmp_path):
    folder = tmp_path / "jpg" / "test" / "gray"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((32, 32), 128, np.uint8), mode="L").save(folder / "0000.jpg")
    images, labels = load_cifar10(tmp_path / "jpg", "test", use_cache=False)
    assert images.shape == (1, 32, 32, 3) and labels.tolist() == [0]
    assert abs(int(images[0, 5, 5, 1]) - 128) <= 2


def test_second_load_hits_cache(archive, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_cifar10(archive, "train", cache_dir=cache)
    assert len(list(cache.glob("train-*.npz"))) == 1

    def fail(_data):
        raise AssertionError("decoder called on a cache hit")

    monkeypatch.setattr(cifar10_module, "_decode_image", fail)
    second = load_cifar10(archive, "train", cache_dir=cache)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    with pytest.raises(AssertionError):
        load_cifar10(archive, "test", cache_dir=cache)  # other split: not cached yet


def test_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TWISTC_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "cifar10"


def _write_pickles(folder, per_batch=4):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
        batches[name] = (data, labels)
    return batches


@pytest.mark.parametrize("use_parent", [False, True])
def test_pickle_batches(tmp_path, use_parent):
    batches = _write_pickles(tmp_path / "cifar-10-batches-py")
    source = tmp_path if use_parent else tmp_path / "cifar-10-batches-py"
    images, labels = load_cifar10(source, "train", use_cache=False)
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    data, batch_labels = batches["data_batch_2"]
    np.testing.assert_array_equal(labels[4:8], batch_labels)
    # Row layout is 1024 red, then green, then blue values, each row-major.
    np.testing.assert_array_equal(images[4, 1, 2], data[0, [32 + 2, 1024 + 32 + 2, 2048 + 32 + 2]])
    test_images, _ = load_cifar10(source, "test", use_cache=False)
    assert test_images.shape == (4, 32, 32, 3)


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_cifar10(tmp_path / "missing", "train")
    with pytest.raises(ValueError):
        load_cifar10(tmp_path, "train", use_cache=False)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError):
        load_cifar10(tmp_path / "notes.txt", "train", use_cache=False)
    with pytest.raises(ValueError):
        load_cifar10(tmp_path, "validation")


def test_random_crop_flip_is_window_of_padded_image():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = random_crop_flip(x, gen)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flips = 0
    for i in range(len(x)):
        windows = {(t, l, f) for t in range(9) for l in range(9) for f in (False, True)
                   if torch.equal(out[i], _window(padded[i], t, l, f))}
        assert windows, f"sample {i} is not a (flipped) window of its padded image"
        flips += any(f for _, _, f in windows)
    assert 10 < flips < 54
    assert (out == 0).any()  # some crops include zero padding


def _window(img, top, left, flip):
    crop = img[:, top:top + 32, left:left + 32]
    return crop.flip(-1) if flip else crop


def test_validation_split():
    train, val = validation_split(1000, 100, seed=3)
    assert len(train) == 900 and len(val) == 100
    assert not np.intersect1d(train, val).size
    np.testing.assert_array_equal(np.union1d(train, val), np.arange(1000))
    again_train, again_val = validation_split(1000, 100, seed=3)
    np.testing.assert_array_equal(val, again_val)
    assert not np.array_equal(val, validation_split(1000, 100, seed=4)[1])
    with pytest.raises(ValueError):
        validation_split(10, 10)


def test_first_per_class():
    labels = np.array([0, 0, 0, 1, 1, 2, 0, 2, 2, 2])
    np.testing.assert_array_equal(first_per_class(labels, 2), [0, 1, 3, 4, 5, 7])


def _toy(n=50):
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % 10


def test_batches_length_and_normalisation():
    images, labels = _toy()
    assert len(CifarBatches(images, labels, batch_size=16)) == 4
    assert len(CifarBatches(images, labels, batch_size=16, drop_last=True)) == 3
    batches = list(CifarBatches(images, labels, batch_size=16))
    assert [len(y) for _, y in batches] == [16, 16, 16, 2]
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape == (16, 3, 32, 32) and y.dtype == torch.int64
    mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    raw = torch.from_numpy(images[0]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(x[0], (raw - mean) / std)
    cl, _ = next(iter(CifarBatches(images, labels, batch_size=16, channels_last=True)))
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, x)


def test_batches_reproducible_per_epoch():
    images, labels = _toy()

    def epochs(loader, count):
        return [[(x.clone(), y.clone()) for x, y in loader] for _ in range(count)]

    kwargs = dict(batch_size=16, shuffle=True, augment=True, seed=7)
    a = epochs(CifarBatches(images, labels, **kwargs), 2)
    b = epochs(CifarBatches(images, labels, **kwargs), 2)
    for ea, eb in zip(a, b):
        for (xa, ya), (xb, yb) in zip(ea, eb):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][0][1], a[1][0][1])  # each epoch reshuffles
    seen = torch.cat([y for _, y in a[0]])
    assert sorted(seen.tolist()) == sorted(labels.tolist())


def test_cifar10_batches_subsets(tmp_path):
    _write_pickles(tmp_path / "cifar-10-batches-py")
    val = cifar10_batches(tmp_path, "train", batch_size=8, subset="val", n_val=5,
                          cache_dir=tmp_path / "cache")
    rest = cifar10_batches(tmp_path, "train", batch_size=8, subset="train-minus-val", n_val=5,
                           cache_dir=tmp_path / "cache")
    assert len(val.labels) == 5 and not val.augment and not val.shuffle
    assert len(rest.labels) == 15 and rest.augment and rest.shuffle
    with pytest.raises(ValueError):
        cifar10_batches(tmp_path, "test", subset="val", cache_dir=tmp_path / "cache")
