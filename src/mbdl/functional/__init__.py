"""Pure tensor maths: distances, loss kernels, kNN and metrics. No state, no I/O."""

from mbdl.functional.distances import DISTANCES, pairwise_distance
from mbdl.functional.pairs import pair_masks

__all__ = ["DISTANCES", "pair_masks", "pairwise_distance"]
