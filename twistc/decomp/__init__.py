"""Decomposition math: pure functions from tensors to factors and back, their cost model, and the
table of decompositions (`DECOMPOSITIONS`, name -> Decomposition) that the passes, the plan and the
report derive everything from.

Nothing here knows about graphs or modules.
"""
from twistc.decomp.base import DEFAULT_RATIO, Decomposition, Layout, RankRequest
from twistc.decomp.cost import Cost, ConvGeometry, conv_cost, tucker_chain_cost
from twistc.decomp.rank import tucker_max_ranks, tucker_ranks_for_ratio, check_tucker_ranks
from twistc.decomp.cp import Cp
from twistc.decomp.tiled_svd import Svd, TiledSvd
from twistc.decomp.tucker import Tucker, Tucker2, hooi, hosvd, tucker2, tucker_ranks_for_energy

DECOMPOSITIONS: dict[str, Decomposition] = {d.name: d for d in (Tucker(), Svd(), TiledSvd(), Cp())}

__all__ = [
    "DECOMPOSITIONS", "DEFAULT_RATIO", "Decomposition", "Layout", "RankRequest",
    "Cost", "ConvGeometry", "conv_cost", "tucker_chain_cost",
    "tucker_max_ranks", "tucker_ranks_for_energy", "tucker_ranks_for_ratio", "check_tucker_ranks",
    "Tucker2", "hooi", "hosvd", "tucker2",
]
