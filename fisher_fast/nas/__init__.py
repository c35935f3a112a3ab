"""Task-aware architecture search (paper §3.2, appendix A): operations, cell genotypes, the
skeleton network and search spaces; FUSE (:func:`fuse_search`), the random-search baseline
(:func:`random_search`) and the final training and test (:func:`train_and_evaluate`)."""

from fisher_fast.nas.cell import Cell
from fisher_fast.nas.final import Evaluation, train_and_evaluate
from fisher_fast.nas.fuse import FuseConfig, fuse_search
from fisher_fast.nas.genotype import NODE_COUNTS, Genotype, edge_list
from fisher_fast.nas.mixture import Mixture
from fisher_fast.nas.network import Network
from fisher_fast.nas.operations import OPERATIONS, make_operation
from fisher_fast.nas.random_search import random_search
from fisher_fast.nas.search_result import Round, SearchResult
from fisher_fast.nas.space import SearchSpace
from fisher_fast.nas.training import NetworkBuilder, Skeleton

__all__ = [
    "NODE_COUNTS",
    "OPERATIONS",
    "Cell",
    "Evaluation",
    "FuseConfig",
    "Genotype",
    "Mixture",
    "Network",
    "NetworkBuilder",
    "Round",
    "SearchResult",
    "SearchSpace",
    "Skeleton",
    "edge_list",
    "fuse_search",
    "make_operation",
    "random_search",
    "train_and_evaluate",
]
