"""Decomposition math: pure functions from tensors to factors and back, and their cost model.

Nothing here knows about graphs or modules.
"""
from twistc.decomp.cost import Cost, ConvGeometry, conv_cost, tucker_chain_cost
from twistc.decomp.rank import tucker_max_ranks, tucker_ranks_for_energy, tucker_ranks_for_ratio, check_tucker_ranks
from twistc.decomp.tucker import Tucker2, hooi, hosvd, tucker2

__all__ = [
    "Cost", "ConvGeometry", "conv_cost", "tucker_chain_cost",
    "tucker_max_ranks", "tucker_ranks_for_energy", "tucker_ranks_for_ratio", "check_tucker_ranks",
    "Tucker2", "hooi", "hosvd", "tucker2",
]
