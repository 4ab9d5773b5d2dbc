"""timm's architectures, built without a working torchvision.

timm imports torchvision when it is imported (its data transforms, datasets and FrozenBatchNorm2d), but
building, tracing and training a model never calls it. On a CPU-only machine the package index's
torchvision wheel is built for CUDA and fails to import next to a CPU torch ("operator torchvision::nms
does not exist"). So `import_timm` imports torchvision first, and when that fails it puts a stand-in
under the name: modules whose attributes are placeholder classes that raise, naming the real cause,
as soon as anything uses them. timm's models work; its data pipeline says clearly that it cannot.

Install timm without letting pip pick a torchvision (which could replace the CPU torch by a CUDA one):

    pip install 'twistc[timm]' && pip install --no-deps 'timm>=1.0'
"""
from __future__ import annotations

import difflib
import enum
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

from torch import nn

INSTALL = "pip install 'twistc[timm]' && pip install --no-deps 'timm>=1.0'"


class InterpolationMode(enum.Enum):
    """torchvision's enum of resampling filters, which timm reads when it is imported."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class StandIn(types.ModuleType):
    """A torchvision module that cannot be imported: every attribute is a class that raises when used."""

    reason = ""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "InterpolationMode":
            return InterpolationMode
        qualname, reason = f"{self.__name__}.{name}", StandIn.reason

        def unavailable(*args, **kwargs):
            raise ImportError(f"{qualname} needs torchvision, which cannot be imported here ({reason}); "
                              "twistc's stand-in lets timm build models, not run its data pipeline")

        placeholder = type(name, (), {"__init__": unavailable, "__module__": self.__name__})
        setattr(self, name, placeholder)
        return placeholder


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return StandIn(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def torchvision_stand_in() -> str | None:
    """Import torchvision, or install the stand-in when it fails; the reason it failed, None when it works."""
    if any(isinstance(f, _StandInFinder) for f in sys.meta_path):
        return StandIn.reason
    try:
        importlib.import_module("torchvision")
        return None
    except Exception as exc:  # a CUDA build next to CPU torch raises RuntimeError, a missing one ImportError
        StandIn.reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # what the failed import left half-built
    sys.meta_path.insert(0, _StandInFinder())
    return StandIn.reason


def import_timm():
    """The timm package, with torchvision or its stand-in; a one-line error when timm is not installed."""
    if importlib.util.find_spec("timm") is None:
        raise ImportError(f"timm is not installed: {INSTALL}")
    torchvision_stand_in()
    return importlib.import_module("timm")


def create_model(name: str, num_classes: int | None = None, pretrained: bool = False) -> nn.Module:
    """timm's `name` in eval mode (random weights unless `pretrained`, which needs its weights on disk or the
    Hugging Face hub); a one-line error naming close matches when timm has no such architecture."""
    timm = import_timm()
    names = timm.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5)
        raise ValueError(f"timm has no architecture {name!r}" + (f" (close: {', '.join(close)})" if close else
                                                                  "; `timm.list_models()` lists them"))
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    return timm.create_model(name, pretrained=pretrained, **kwargs).eval()


def input_size(name: str) -> tuple[int, int, int]:
    """(channels, height, width) of one sample at the architecture's default size (timm's pretrained config)."""
    config = import_timm().get_pretrained_cfg(name)
    return tuple(config.input_size) if config is not None else (3, 224, 224)
