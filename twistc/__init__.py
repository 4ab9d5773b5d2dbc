"""twistc: a compiler that makes trained CNNs smaller and faster by low-rank approximation.

    gm = twistc.trace(model, example_inputs)
    gm = twistc.Pipeline.parse("deeptwist{ratio=4},train{epochs=3},lower-conv-tucker,cleanup").run(gm, ctx)
    twistc.export_onnx(gm, example_inputs, "model.onnx")
"""
from twistc.errors import TwistcError
from twistc.export import export_onnx
from twistc.pipeline import Pass, PassResult, Pipeline, RunContext
from twistc.plan import LayerPlan, Plan
from twistc.state import state_of
from twistc.trace import trace
from twistc.train import accuracy, final_projection, train

__version__ = "0.1.0"
__all__ = ["TwistcError", "export_onnx", "Pass", "PassResult", "Pipeline", "RunContext", "LayerPlan", "Plan",
           "state_of", "trace", "accuracy", "final_projection", "train"]
