"""The Fisher kinds a task distance can use, and which labels each one takes.

Which labels a FIM uses depends on the Fisher kind, and this matters for the distance:

* ``"exact"`` (default) and ``"mc"``: only the source network's own predictive distribution
  (all head units; exact sums over them, mc draws ``mc_samples`` labels per sample). Task b
  contributes its test *inputs* only, so the meaning of labels never has to agree across tasks.
* ``"empirical"`` (paper eq. 2): task b's test *labels* are fed to the source network a: label
  k is scored on a's head unit k, although k may mean something else in task a (for the digits
  suite, label 0 is "digit 0" in tasks 0, 2, 3 but "digit 6" in task 1).

The texts of :data:`LABEL_CONVENTIONS` are recorded with every result, so a results file says
which convention its numbers follow.
"""

from __future__ import annotations

LABEL_CONVENTIONS = {
    "exact": "F[a,b] uses no labels: the expectation over the source network a's own predictive distribution "
    "(all head units) on task b's test inputs",
    "mc": "F[a,b] uses labels drawn from the source network a's own predictive distribution on task b's test inputs",
    "empirical": "F[a,b] scores the source network a on task b's test labels (task label k -> head unit k), "
    "whose meaning can differ between tasks a and b",
}


def check_fisher(fisher: str) -> None:
    """Raise a ValueError naming the known kinds unless ``fisher`` is one of them."""
    if fisher not in LABEL_CONVENTIONS:
        raise ValueError(
            f"fisher must be one of {', '.join(map(repr, LABEL_CONVENTIONS))}, got {fisher!r}"
        )
