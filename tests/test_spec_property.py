"""Property tests of the pipeline-spec parser: what it accepts prints back identically; anything else is a
TwistcError, never another exception."""
from hypothesis import given, settings
from hypothesis import strategies as st

from twistc.errors import TwistcError
from twistc.pipeline import Pipeline

NAMES = ["deeptwist", "train", "lower-conv-tucker", "lower-conv-svd", "lower-conv-tiled-lowrank", "cleanup",
         "plan-latency", "tucker", "deeptwist-tucker", "nope"]
KEYS = ["ratio", "ranks", "energy", "round_to", "layers", "period", "decomp", "epochs", "lr", "tile", "grid",
        "order", "speedup", "steps", "optimizer", "amp", "momentum", "form", "im2col", "x"]
VALUES = st.one_of(st.integers(-3, 300).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.sampled_from(["2x2", "0x3", "4x4x4", "x", "", "layer*", "svd", "tucker", "tiled-svd", "adamw",
                                    "bf16", "true", "maybe", "channel-major", "conv"]))
ITEM = st.builds(lambda name, opts: name + ("{" + ",".join(f"{k}={v}" for k, v in opts) + "}" if opts else ""),
                 st.sampled_from(NAMES), st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=3))
SPECS = st.lists(ITEM, min_size=1, max_size=4).map(",".join)


def _parse(spec: str):
    try:
        return Pipeline.parse(spec)
    except TwistcError:
        return None


@settings(max_examples=300, deadline=None)
@given(SPECS)
def test_structured_specs_print_back_or_fail_cleanly(spec):
    pipeline = _parse(spec)
    if pipeline is not None:
        assert str(Pipeline.parse(str(pipeline))) == str(pipeline)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="ascii"), max_size=40))
def test_random_strings_never_raise_anything_but_twistc_errors(spec):
    _parse(spec)
