"""twistc: a compiler that makes trained CNNs smaller and faster by low-rank approximation.

    gm = twistc.trace(model, example_inputs)
    gm = twistc.Pipeline.parse("deeptwist{ratio=4},train{epochs=3},lower,cleanup").run(gm, ctx)
    twistc.export_onnx(gm, example_inputs, "model.onnx")

The names below load their modules (and torch) on first use, so that the command line starts at once.
"""
import importlib
import sys
import types

__version__ = "0.1.0"
_HOMES = {"TwistcError": "twistc.errors", "export_onnx": "twistc.export", "Pass": "twistc.pipeline",
          "PassResult": "twistc.pipeline", "Pipeline": "twistc.pipeline", "RunContext": "twistc.pipeline",
          "LayerPlan": "twistc.plan", "Plan": "twistc.plan", "state_of": "twistc.state", "trace": "twistc.trace",
          "accuracy": "twistc.evaluation", "final_projection": "twistc.train", "train": "twistc.train"}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'twistc' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """`twistc.trace` and `twistc.train` are the functions, also after their modules of the same name load
    (the import system would bind the names to the modules)."""

    def __setattr__(self, name, value):
        if name in _HOMES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
