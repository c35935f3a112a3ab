"""Tasks, ε-approximation probes and the Fréchet task distance matrix (paper §3.1, §4.1-4.3).

* :class:`Task` / :class:`DataSource`: a classification task defined on a data set by a class
  mapping, balanced and split as in the paper; built-in suites in :mod:`.suites`, readers in
  :mod:`.loaders`, JSON task files in :mod:`.loaders.config`.
* :func:`make_probe` / :func:`train_probe`: ε-approximation networks (Definition 2).
* :func:`task_fim` / :func:`task_distance` (:mod:`.task_fisher`): a probe's FIM on a task and
  Definition 4 for one pair; :func:`distance_matrix` (:mod:`.distance_study`): the matrix over
  seeds (:class:`DistanceResult`, :mod:`.matrix_result`), its jobs dealt to the ranks by
  :mod:`.job_schedule`, with a run directory whose probes and FIMs :mod:`.run_store` gets or
  computes (files: :mod:`.cache`), reported by :mod:`.report`.
* :mod:`.dense`: the image-to-image tasks of §4.4 and their study against a transfer affinity.
"""

from fisher_fast.part import Part
from fisher_fast.tasks.cache import CacheWarning, RunCache
from fisher_fast.tasks.distance_study import distance_matrix
from fisher_fast.tasks.fisher_kinds import LABEL_CONVENTIONS
from fisher_fast.tasks.loaders.config import load_task_config
from fisher_fast.tasks.matrix_result import DistanceResult
from fisher_fast.tasks.probes import PROBES, SMALL_PROBES, make_probe
from fisher_fast.tasks.report import format_matrix, plot_heatmaps, save_result
from fisher_fast.tasks.source import DataSource, SourceData
from fisher_fast.tasks.suites import SUITES, Suite, get_suite
from fisher_fast.tasks.task import Task, TaskSplits
from fisher_fast.tasks.task_fisher import task_distance, task_fim
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
