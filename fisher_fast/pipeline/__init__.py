"""Algorithm 1 end to end (paper §3.2): the task dictionary of baseline tasks and their best
cells (:class:`TaskDictionary`), the search for a new target in the restricted space of its
closest baseline (:func:`search_architecture`) and the main job that reports it against random
search, the full space and hand-designed networks (:func:`run_main_job`)."""

from fisher_fast.pipeline.algorithm import (
    REPORTED_KINDS,
    ArchitectureReport,
    TargetDistances,
    baseline_distances,
    closest_baseline,
    distances_by_kind,
    search_architecture,
)
from fisher_fast.pipeline.dictionary import (
    Baseline,
    DictionaryError,
    DictionarySettings,
    TaskDictionary,
    build_dictionary,
)
from fisher_fast.pipeline.main_job import MainJobResult, run_main_job
from fisher_fast.pipeline.table import Row, format_table

__all__ = [
    "REPORTED_KINDS",
    "ArchitectureReport",
    "Baseline",
    "DictionaryError",
    "DictionarySettings",
    "MainJobResult",
    "Row",
    "TargetDistances",
    "TaskDictionary",
    "baseline_distances",
    "build_dictionary",
    "closest_baseline",
    "distances_by_kind",
    "format_table",
    "run_main_job",
    "search_architecture",
]
