"""What every training loop of the package shares: scoring a classifier on labelled data
(:func:`evaluate`) and keeping the best of the states a loop scores (:class:`KeepBest`).

The probes of :mod:`fisher_fast.tasks` keep their best epoch, the final training of
:mod:`fisher_fast.nas` its best validation check, and random search its best trial, all by the
same rule: scores are tuples, larger is better, and only a strictly greater score replaces the
best, so the earlier candidate wins ties. This module sits below both packages (it imports
neither), so that the rule and the metric are written once.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fisher_fast.part import Part


@torch.no_grad()
def evaluate(
    model: nn.Module, part: Part, device: str | torch.device, batch_size: int = 1024
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of classifier ``model`` in eval mode on ``part``.

    ``model`` maps inputs (B, ...) to logits (B, num_classes); the accuracy is the fraction in
    [0, 1] of samples whose largest logit is their label, the loss the cross-entropy in nats
    averaged over the samples. Batches of ``batch_size`` samples are moved to ``device`` one at
    a time, so ``part`` may stay on the CPU. The model's train / eval mode is restored.
    """
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(part), batch_size):
        x = part.x[start : start + batch_size].to(device)
        y = part.y[start : start + batch_size].to(device)
        logits = model(x)
        correct += int((logits.argmax(1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
    model.train(was_training)
    return correct / len(part), loss / len(part)


class KeepBest:
    """The best so far of the candidates a loop scores (epochs, validation checks, trials).

    :meth:`offer` a candidate's score and index after each one; :attr:`score` and
    :attr:`index` then name the best. Scores are tuples compared in order, larger is better
    (e.g. ``(accuracy, -loss)``: accuracy first, ties to the lower loss); only a strictly
    greater score replaces the best, so the earlier candidate wins ties.

    With ``model``, a deep copy of its ``state_dict()`` is taken at each new best (a copy: the
    training that follows does not change it), and :meth:`restore` loads it back into the model.
    """

    def __init__(self, model: nn.Module | None = None, *, index: int = 0) -> None:
        """``model``: whose state to keep (None: keep only the score and index). ``index``:
        what :attr:`index` says while no score has been offered."""
        self.model = model
        self.score: tuple[float, ...] | None = None
        self.index = index
        self._state: dict[str, torch.Tensor] | None = None

    def offer(self, score: tuple[float, ...], index: int) -> bool:
        """Take candidate ``index`` with ``score`` as the best when it is the first offered or
        its score is strictly greater than the best so far; returns whether it was taken."""
        if self.score is not None and not score > self.score:
            return False
        self.score, self.index = score, index
        if self.model is not None:
            self._state = copy.deepcopy(self.model.state_dict())
        return True

    def restore(self) -> None:
        """Load the best candidate's state into the model; nothing when no state was kept (no
        model, or no score offered), so the model keeps its last state."""
        if self.model is not None and self._state is not None:
            self.model.load_state_dict(self._state)
