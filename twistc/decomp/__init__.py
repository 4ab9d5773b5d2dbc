"""Decompositions: pure functions from tensors to factors and back, their cost model, the modules their
lowered forms put in a layer's place, and the tables that the passes, the plan and the report derive
everything from: `DECOMPOSITIONS` (name -> Decomposition) and `FORMS` (form name -> its decomposition and
Form row).

Nothing here knows about graphs.
"""
from twistc.decomp.base import DEFAULT_RATIO, Decomposition, Form, Layout, RankRequest
from twistc.decomp.cost import Cost, ConvGeometry, conv_cost, tucker_chain_cost
from twistc.decomp.rank import tucker_max_ranks, tucker_ranks_for_ratio, check_tucker_ranks
from twistc.decomp.cp import Cp
from twistc.decomp.tiled_svd import Svd, TiledSvd
from twistc.decomp.tucker import Tucker, Tucker2, hooi, hosvd, tucker2, tucker_ranks_for_energy

DECOMPOSITIONS: dict[str, Decomposition] = {d.name: d for d in (Tucker(), Svd(), TiledSvd(), Cp())}
FORMS: dict[str, tuple[Decomposition, Form]] = {f.name: (d, f) for d in DECOMPOSITIONS.values() for f in d.forms}

__all__ = [
    "DECOMPOSITIONS", "DEFAULT_RATIO", "Decomposition", "FORMS", "Form", "Layout", "RankRequest",
    "Cost", "ConvGeometry", "conv_cost", "tucker_chain_cost",
    "tucker_max_ranks", "tucker_ranks_for_energy", "tucker_ranks_for_ratio", "check_tucker_ranks",
    "Tucker2", "hooi", "hosvd", "tucker2",
]
