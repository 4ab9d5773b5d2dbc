"""The presets: named pipelines that `--pass NAME` runs. A run's settings fill the options their stages
leave out (each stage's `run_defaults`: twistc.pipeline.Item), and the CLI's flags extend them
(twistc.commands.preset_items)."""
from __future__ import annotations

from twistc.passes.cleanup import Cleanup
from twistc.passes.deeptwist import DeepTwist
from twistc.passes.fold import Fold
from twistc.passes.lower import Lower
from twistc.passes.train import Train
from twistc.pipeline import Item, Preset, register_preset


def _deeptwist(name: str, decomp: str, summary: str, plans: bool = False) -> Preset:
    return Preset(name, (Item.of(DeepTwist, decomp=decomp), Item(Train), Item(Lower), Item(Fold), Item(Cleanup)), summary,
                  hands_off=True, plans=plans)


for _preset in (
    Preset("tucker", (Item(Lower), Item(Fold), Item(Cleanup)),
           "conventional: Tucker-2 for kxk convs, SVD pairs for 1x1 convs, Linear layers and convs Tucker leaves, "
           "then fine-tune the decomposed model (adds train when epochs > 0)", fine_tunes=True, plans=True),
    _deeptwist("deeptwist-tucker", "natural",
               "DeepTwist: train in the original shape with periodic projections (Tucker-2 for kxk convs, SVD for "
               "1x1 convs and Linear layers), then lower", plans=True),
    _deeptwist("deeptwist-svd", "svd", "DeepTwist with SVD of each conv's lowered (im2col) matrix and each Linear "
               "weight, lowered to conv pairs and Linear pairs"),
    _deeptwist("deeptwist-cp", "cp", "DeepTwist with CP projections (Lebedev et al. 2015), lowered to 1x1, kh x 1, "
               "1 x kw and 1x1 convs"),
    _deeptwist("deeptwist-tiled-svd", "tiled-svd", "DeepTwist with tiled SVD of each lowered matrix, lowered to tiled "
               "GEMMs or grouped convs"),
):
    register_preset(_preset)
