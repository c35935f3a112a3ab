"""fisher_fast: diagonal Fisher information, Fréchet task distance and task-aware NAS for PyTorch."""

from fisher_fast import ops
from fisher_fast._library import build_info, is_loaded
from fisher_fast._version import __version__
from fisher_fast.distance import frechet_distance, frechet_distance_full, frechet_distances
from fisher_fast.fim import Call, DiagFIM, RuleContext, diag_fim, register_rule, sample_labels

__all__ = [
    "Call",
    "DiagFIM",
    "RuleContext",
    "diag_fim",
    "register_rule",
    "sample_labels",
    "__version__",
    "build_info",
    "frechet_distance",
    "frechet_distance_full",
    "frechet_distances",
    "is_loaded",
    "ops",
]
