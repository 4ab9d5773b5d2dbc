"""Ranks that never destroy a layer: a classifier head keeps a direction per class (or stays dense), an
RGB stem keeps its input channels, and an achieved ratio far above the asked one is a warning."""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from twistc import Pipeline, state_of, trace


class Small(nn.Module):
    """An RGB stem, a body, and a 4-class head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.body = nn.Conv2d(32, 32, 3, padding=1)
        self.mid = nn.Linear(32, 64)
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        h = F.relu(self.body(F.relu(self.stem(x)))).mean((2, 3))
        return self.head(F.relu(self.mid(h))).softmax(-1)


def _run(spec):
    gm = trace(Small().eval(), (torch.randn(1, 3, 8, 8),))
    return state_of(Pipeline.parse(spec).run(gm))


@pytest.mark.parametrize("spec", ["lower-linear-svd{ratio=2}", "lower-linear-svd{energy=0.5}",
                                  "lower-linear-svd{rank=vbmf}"])
def test_a_head_with_few_classes_is_never_cut_below_its_output_count(spec):
    state = _run(spec)
    head = state.layers["head"]
    assert head.lowering is None and head.skip_reason.startswith("the model's head: it keeps a rank per output (4)")
    assert state.layers["mid"].lowering == "svd-linear"  # not a head: compressed


def test_an_rgb_stem_keeps_every_value_it_reads():
    state = _run("lower-conv-tucker{ratio=2}")
    stem, body = state.layers["stem"], state.layers["body"]
    assert body.lowering == "tucker-chain" and state.plan.get("body").ranks[1] < 32
    # its 3 channels on the input side and its 27 values on the output side: no Tucker form of it is smaller
    assert stem.lowering is None
    assert stem.skip_reason.startswith("the model's stem: it keeps its 3 input channels and every value it reads "
                                       "(27 with its 3x3 taps), and ratio 2 is out of reach keeping ranks of at "
                                       "least 27x3")


def test_explicit_ranks_are_taken_as_given():
    state = _run("lower-linear-svd{ranks=2,layers=head}")
    assert state.plan.get("head").ranks == (2,)


def test_an_overshooting_ratio_is_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        _run("lower-conv-tucker{ratio=25,layers=body}")  # ranks 3x3 give 33.8x
    assert "warning: layer body: ratio" in caplog.text and "was asked" in caplog.text


class BigBody(nn.Module):
    """A thin layer that holds a tiny share of the weights next to a wide body."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.thin = nn.Conv2d(8, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 256, 3, padding=1)
        self.more = nn.Conv2d(256, 256, 3, padding=1)

    def forward(self, x):
        return self.more(F.relu(self.body(F.relu(self.thin(F.relu(self.stem(x))))))).mean((2, 3))


def test_a_layer_too_small_to_matter_stays_dense_unless_named():
    gm = trace(BigBody().eval(), (torch.randn(1, 3, 8, 8),))
    state = state_of(Pipeline.parse("lower-conv-tucker{ratio=2}").run(gm))
    assert state.layers["thin"].lowering is None and "save too little to matter" in state.layers["thin"].skip_reason
    assert state.layers["more"].lowering == "tucker-chain"
    named = state_of(Pipeline.parse("lower-conv-tucker{ratio=1.5,layers=thin}").run(
        trace(BigBody().eval(), (torch.randn(1, 3, 8, 8),))))
    assert named.layers["thin"].lowering == "tucker-chain"


def test_plan_latency_offers_no_candidate_below_a_floor():
    from twistc.convs import conv_sites
    from twistc.passes.plan_latency import PlanLatency

    gm = trace(Small().eval(), (torch.randn(1, 3, 8, 8),))
    planner = PlanLatency.from_options({"speedup": "1.5", "forms": "tucker-chain|svd-conv|svd-linear"})
    candidates = {site.name: planner.candidates(gm, site) for site in conv_sites(gm)}
    assert candidates["head"] == []  # rank 4 of a 64x4 head is the dense layer's size: it stays dense
    assert candidates["stem"] == []  # it keeps its 3 channels (Tucker) or all 27 values it reads (SVD): none is smaller
    assert any(e.ranks[0] < 32 for e in candidates["mid"])  # not a head: the whole grid


class Patches(nn.Module):
    """A transformer-like stem: a grey image cut into 2x2 patches, each embedded by one conv."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.patches = nn.Conv2d(1, 48, 2, stride=2)
        self.mix = nn.Linear(48, 48)
        self.head = nn.Linear(48, 10)

    def forward(self, x):
        tokens = self.patches(x).flatten(2).transpose(1, 2)
        return self.head(F.relu(self.mix(tokens)).mean(1))


@pytest.mark.parametrize("spec", ["lower-conv-svd{ratio=2},lower-linear-svd{ratio=2}",
                                  "deeptwist{decomp=svd,ratio=2},lower-conv-svd,lower-linear-svd",
                                  "lower{ratio=2}", "deeptwist{decomp=natural,ratio=2},lower"])
def test_a_patch_embedding_keeps_every_pixel_it_reads(spec):
    gm = trace(Patches().eval(), (torch.randn(1, 1, 8, 8),))
    state = state_of(Pipeline.parse(spec).run(gm))
    patches = state.layers["patches"]  # rank 1 of its 48x4 matrix would fold 4 pixels into one direction
    assert patches.lowering is None
    assert patches.skip_reason.startswith("the model's stem: it keeps its 1 input channel and every value it reads (4 with its 2x2 taps)")
    assert state.layers["mix"].lowering == "svd-linear"
