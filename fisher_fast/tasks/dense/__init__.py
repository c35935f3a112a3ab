"""Image-to-image tasks (paper §4.4): tasks computed from real embedded images, the appendix-A
autoencoder probe, and the study that compares the Fréchet task distance with a transfer
affinity.

* :class:`ImageTask` / :class:`DenseSuite` (:mod:`.suite`), built-in suites in
  :data:`DENSE_SUITES`; image filters in :mod:`.filters`;
* :func:`make_autoencoder` (:mod:`.probe`), :func:`train_autoencoder` (:mod:`.training`);
* :func:`dense_study` (:mod:`.study`), its :class:`DenseStudyResult` (:mod:`.study_result`)
  and :func:`rank_agreement` (:mod:`.ranks`), reported by :mod:`.report`.
"""

from fisher_fast.tasks.dense.probe import AutoencoderProbe, make_autoencoder
from fisher_fast.tasks.dense.ranks import rank_agreement
from fisher_fast.tasks.dense.study import dense_study
from fisher_fast.tasks.dense.study_result import DenseStudyResult
from fisher_fast.tasks.dense.suite import (
    DENSE_SUITES,
    DenseSuite,
    ImageTask,
    image_tasks,
    mnist5k_dense_suite,
)
from fisher_fast.tasks.dense.training import DenseProbe, train_autoencoder

__all__ = [
    "DENSE_SUITES",
    "AutoencoderProbe",
    "DenseProbe",
    "DenseStudyResult",
    "DenseSuite",
    "ImageTask",
    "dense_study",
    "image_tasks",
    "make_autoencoder",
    "mnist5k_dense_suite",
    "rank_agreement",
    "train_autoencoder",
]
