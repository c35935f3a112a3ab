"""Task-aware architecture search (paper §3.2, appendix A): operations, cell genotypes, the
skeleton network and search spaces."""

from fisher_fast.nas.cell import Cell
from fisher_fast.nas.genotype import NODE_COUNTS, Genotype, edge_list
from fisher_fast.nas.network import Network
from fisher_fast.nas.operations import OPERATIONS, make_operation
from fisher_fast.nas.space import SearchSpace

__all__ = [
    "NODE_COUNTS",
    "OPERATIONS",
    "Cell",
    "Genotype",
    "Network",
    "SearchSpace",
    "edge_list",
    "make_operation",
]
