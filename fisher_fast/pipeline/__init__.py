"""Algorithm 1 end to end (paper §3.2): the task dictionary of baseline tasks and their best
cells (:class:`TaskDictionary`), the search for a new target in the restricted space of its
closest baseline (:func:`search_architecture`) and the main job that reports it against random
search, the full space and hand-designed networks (:func:`run_main_job`)."""

from fisher_fast.pipeline.algorithm import (
    ArchitectureReport,
    baseline_distances,
    closest_baseline,
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
    "ArchitectureReport",
    "Baseline",
    "DictionaryError",
    "DictionarySettings",
    "MainJobResult",
    "Row",
    "TaskDictionary",
    "baseline_distances",
    "build_dictionary",
    "closest_baseline",
    "format_table",
    "run_main_job",
    "search_architecture",
]
