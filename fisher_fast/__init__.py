"""fisher_fast: diagonal Fisher information, Fréchet task distance and task-aware NAS for PyTorch."""

from fisher_fast import ops
from fisher_fast._library import build_info, is_loaded
from fisher_fast._version import __version__
from fisher_fast.distance import frechet_distance, frechet_distance_full, frechet_distances

__all__ = [
    "__version__",
    "build_info",
    "frechet_distance",
    "frechet_distance_full",
    "frechet_distances",
    "is_loaded",
    "ops",
]
