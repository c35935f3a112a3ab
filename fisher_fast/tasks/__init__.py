"""Tasks, ε-approximation probes and the Fréchet task distance matrix (paper §3.1, §4.1-4.3).

* :class:`Task` / :class:`DataSource`: a classification task defined on a data set by a class
  mapping, balanced and split as in the paper; built-in suites in :mod:`.suites`, readers in
  :mod:`.loaders`, JSON task files in :mod:`.loaders.config`.
* :func:`make_probe` / :func:`train_probe`: ε-approximation networks (Definition 2).
* :func:`task_distance` / :func:`distance_matrix`: Definition 4 and the matrix over seeds
  (:class:`DistanceResult`, :mod:`.matrix`), with a run directory that caches probes and FIMs
  (:mod:`.cache`), reported by :mod:`.report`.
* :mod:`.dense`: the image-to-image tasks of §4.4 and their study against a transfer affinity.
"""

from fisher_fast.part import Part
from fisher_fast.tasks.cache import CacheWarning, RunCache
from fisher_fast.tasks.distances import distance_matrix, task_distance, task_fim
from fisher_fast.tasks.loaders.config import load_task_config
from fisher_fast.tasks.matrix import LABEL_CONVENTIONS, DistanceResult
from fisher_fast.tasks.probes import PROBES, SMALL_PROBES, make_probe
from fisher_fast.tasks.report import format_matrix, plot_heatmaps, save_result
from fisher_fast.tasks.source import DataSource, SourceData
from fisher_fast.tasks.suites import SUITES, Suite, get_suite
from fisher_fast.tasks.task import Task, TaskSplits
from fisher_fast.tasks.train import EpsilonWarning, Probe, TrainConfig, train_probe

__all__ = [
    "LABEL_CONVENTIONS",
    "PROBES",
    "SMALL_PROBES",
    "SUITES",
    "CacheWarning",
    "DataSource",
    "DistanceResult",
    "EpsilonWarning",
    "Part",
    "Probe",
    "RunCache",
    "SourceData",
    "Suite",
    "Task",
    "TaskSplits",
    "TrainConfig",
    "distance_matrix",
    "format_matrix",
    "get_suite",
    "load_task_config",
    "make_probe",
    "plot_heatmaps",
    "save_result",
    "task_distance",
    "task_fim",
    "train_probe",
]
