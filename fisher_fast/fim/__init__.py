"""Diagonal Fisher information of any nn.Module: engine, per-layer rules and the result type."""

from fisher_fast.fim.check import CheckReport, check
from fisher_fast.fim.engine import diag_fim
from fisher_fast.fim.losses import sample_labels
from fisher_fast.fim.result import DiagFIM, DiagFIMFileError, UncheckedFileWarning
from fisher_fast.fim.rules import Call, RuleContext, register_rule

__all__ = [
    "Call",
    "CheckReport",
    "DiagFIM",
    "DiagFIMFileError",
    "RuleContext",
    "UncheckedFileWarning",
    "check",
    "diag_fim",
    "register_rule",
    "sample_labels",
]
