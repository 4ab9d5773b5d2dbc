"""Tests for the CIFAR ResNet definition and the reference ResNet-32 checkpoint."""

import importlib.util
from pathlib import Path

import pytest
import torch

from twistc.data import CifarBatches, first_per_class, load_cifar10
from twistc.models import PadShortcut, load_resnet32, resnet_cifar

REPO = Path(__file__).parents[2]
DATA = REPO / ".." / "shared" / "data"
CKPT = DATA / "resnet32_cifar10.pt"
ARCHIVE = DATA / "cifar10-jpg.tar.gz"
SLICE_ACCURACY = 89.50

needs_data = pytest.mark.skipif(not (CKPT.is_file() and ARCHIVE.is_file()),
                                reason="../shared/data with the checkpoint and CIFAR-10 is absent")


def test_resnet32_parameter_count():
    model = resnet_cifar(32)
    assert sum(p.numel() for p in model.parameters()) == 464_154
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == 5


def test_depth_must_be_6n_plus_2():
    with pytest.raises(ValueError):
        resnet_cifar(30)
    assert len(resnet_cifar(20).layer2) == 3


def test_fx_trace_matches_eager():
    model = resnet_cifar(32).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(traced(x), out)
    assert out.shape == (2, 10)


def test_shortcut_splits_zero_channels_evenly():
    x = torch.arange(1, 1 + 2 * 16 * 4 * 4, dtype=torch.float32).view(2, 16, 4, 4)
    out = PadShortcut(16, 32, stride=2)(x)
    assert out.shape == (2, 32, 2, 2)
    assert not out[:, :8].any() and not out[:, 24:].any()
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])


def _accuracy(model, images, labels) -> float:
    correct = 0
    with torch.no_grad():
        for x, y in CifarBatches(images, labels, batch_size=500):
            correct += (model(x).argmax(1) == y).sum().item()
    return 100.0 * correct / len(labels)


@needs_data
def test_checkpoint_reproduces_slice_accuracy():
    torch.set_num_threads(2)
    model = load_resnet32(CKPT)
    assert not model.training
    images, labels = load_cifar10(ARCHIVE, "test")
    idx = first_per_class(labels, 100)
    assert len(idx) == 1000
    assert abs(_accuracy(model, images[idx], labels[idx]) - SLICE_ACCURACY) <= 0.3


@needs_data
def test_example_model_file_serves_slice():
    spec = importlib.util.spec_from_file_location("resnet32_example",
                                                  REPO / "examples" / "resnet32_cifar10.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model = example.model(checkpoint=str(CKPT))
    (x,) = example.example_inputs()
    assert x.shape == (1, 3, 32, 32) and model(x).shape == (1, 10)
    batches = example.eval_data(root=str(ARCHIVE), split="slice", batch_size=250)
    assert len(batches) == 4 and len(batches.labels) == 1000
