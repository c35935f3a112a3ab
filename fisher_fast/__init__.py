"""fisher_fast: diagonal Fisher information, Fréchet task distance and task-aware NAS for PyTorch."""

from fisher_fast import distributed, ops
from fisher_fast._library import build_info, is_loaded
from fisher_fast._version import __version__
from fisher_fast.distance import frechet_distance, frechet_distance_full, frechet_distances
from fisher_fast.distributed import shard
from fisher_fast.fim import (
    Call,
    CheckReport,
    DiagFIM,
    RuleContext,
    check,
    diag_fim,
    register_rule,
    sample_labels,
)
from fisher_fast.pipeline import (
    DictionarySettings,
    TaskDictionary,
    build_dictionary,
    search_architecture,
)
from fisher_fast.tasks import (
    DataSource,
    DistanceResult,
    Probe,
    Suite,
    Task,
    TrainConfig,
    distance_matrix,
    get_suite,
    make_probe,
    task_distance,
    train_probe,
)

__all__ = [
    "Call",
    "CheckReport",
    "DataSource",
    "DiagFIM",
    "DictionarySettings",
    "DistanceResult",
    "Probe",
    "RuleContext",
    "Suite",
    "Task",
    "TaskDictionary",
    "TrainConfig",
    "__version__",
    "build_dictionary",
    "build_info",
    "check",
    "diag_fim",
    "distance_matrix",
    "distributed",
    "frechet_distance",
    "frechet_distance_full",
    "frechet_distances",
    "get_suite",
    "is_loaded",
    "make_probe",
    "ops",
    "register_rule",
    "sample_labels",
    "search_architecture",
    "shard",
    "task_distance",
    "train_probe",
]
