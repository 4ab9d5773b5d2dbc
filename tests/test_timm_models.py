"""timm without a working torchvision: the stand-in, and a timm model through the compiler when timm is installed."""
import importlib.util
import sys

import pytest
import torch

from twistc.models import timm_models


@pytest.fixture
def broken_torchvision(tmp_path, monkeypatch):
    """A torchvision that fails to import as the CUDA wheel does next to a CPU torch; removed afterwards."""
    package = tmp_path / "torchvision"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = {k: v for k, v in sys.modules.items() if k == "torchvision" or k.startswith("torchvision.")}
    for k in saved:
        del sys.modules[k]
    meta_path = list(sys.meta_path)
    yield
    sys.meta_path[:] = meta_path
    for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        del sys.modules[k]
    sys.modules.update(saved)


def test_a_broken_torchvision_is_replaced_by_a_stand_in_that_names_the_cause(broken_torchvision):
    reason = timm_models.torchvision_stand_in()
    assert reason == "RuntimeError: operator torchvision::nms does not exist"
    from torchvision.ops.misc import FrozenBatchNorm2d  # what timm imports when it is imported
    from torchvision.transforms.functional import InterpolationMode
    assert InterpolationMode.BICUBIC.value == "bicubic"
    with pytest.raises(ImportError, match=r"torchvision\.ops\.misc\.FrozenBatchNorm2d needs torchvision.*nms"):
        FrozenBatchNorm2d(8)
    assert timm_models.torchvision_stand_in() == reason  # installed once


def test_a_working_torchvision_is_left_alone(tmp_path, monkeypatch, broken_torchvision):
    (tmp_path / "torchvision" / "__init__.py").write_text("WORKS = True\n")
    assert timm_models.torchvision_stand_in() is None
    import torchvision
    assert torchvision.WORKS


def test_without_timm_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match=r"timm is not installed: pip install 'twistc\[timm\]'"):
        timm_models.import_timm()


needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")


@needs_timm
def test_an_unknown_architecture_is_one_line_naming_close_ones():
    with pytest.raises(ValueError, match=r"timm has no architecture 'resnet1800' \(close: .*resnet18"):
        timm_models.create_model("resnet1800")


@needs_timm
@pytest.mark.slow
def test_a_timm_network_lowers_to_its_projected_weights_with_the_natural_forms():
    import copy

    from twistc import Pipeline, state_of, trace

    model = timm_models.create_model("mobilenetv3_small_050", num_classes=10)
    x = torch.randn(2, 3, 96, 96)
    gm = Pipeline.parse("lower-conv-tucker{ratio=2},lower-conv-svd{ratio=2},lower-linear-svd{ratio=2},cleanup").run(trace(model, (x[:1],)))
    state = state_of(gm)
    lowered = {name: r.lowering for name, r in state.layers.items() if r.lowering}
    assert "svd-conv" in lowered.values() and "conv_head" in lowered  # its 1x1 convs
    assert "classifier" not in lowered  # a 10-class head cannot be halved above rank 10: it stays dense
    projected = copy.deepcopy(model)
    with torch.no_grad():
        for name in lowered:
            weight = projected.get_parameter(f"{name}.weight")
            weight.copy_(state.plan.get(name).project(weight)[0])
        torch.testing.assert_close(gm(x), projected(x), rtol=1e-3, atol=1e-4)
