"""Checks of the labels, the losses and the Fisher accumulator, without a host sync per batch.

Reading a device flag on the host waits for every kernel queued before it; on a GPU three such
waits per batch keep the device idle while the host prepares the next batch. The guard records
each check as a device-side flag and reads them all at once every few batches (and at the end,
before diag_fim returns), then raises for the first flagged check, naming its samples as an
immediate check would: a label outside the model's classes (the loss was computed with labels
clamped into range, so nothing indexed out of range meanwhile, and is never returned), a loss
that is not finite, or the layer nearest the loss whose contribution was not. On the CPU a flag
costs no wait, so it is read at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fisher_fast.fim.losses import LabelCheck
from fisher_fast.fim.plan import OwnerPlan

DEFERRED_BATCHES = 8  # batches between host reads of the flags on an accelerator


def batches_between_reads(device: torch.device) -> int:
    """1 on the CPU (reading a flag waits for nothing), ``DEFERRED_BATCHES`` elsewhere."""
    return 1 if device.type == "cpu" else DEFERRED_BATCHES


@dataclass
class _Pending:
    bad: torch.Tensor  # 0-dim bool on the device
    samples: str  # e.g. "0..255"
    loss: torch.Tensor | None = None  # the objective, for a loss check
    processed: tuple[OwnerPlan, ...] = ()  # owners of an accumulator check, in backward order
    labels: LabelCheck | None = None  # for a label check


class FiniteGuard:
    """Device-side label and finiteness flags, read every ``DEFERRED_BATCHES`` batches off the
    CPU."""

    def __init__(self, device: torch.device) -> None:
        self.every = batches_between_reads(device)
        self.pending: list[_Pending] = []
        self.batches = 0

    def labels(self, check: LabelCheck, samples: str) -> None:
        """Flag labels of the batch of ``samples`` outside the model's classes."""
        self.pending.append(_Pending(check.outside, samples, labels=check))
        if self.every == 1:
            self.flush({})

    def loss(self, objective: torch.Tensor, samples: str) -> None:
        """Flag a non-finite objective of the batch of ``samples``."""
        bad = ~torch.isfinite(objective.detach())
        self.pending.append(_Pending(bad, samples, loss=objective.detach()))
        if self.every == 1:
            self.flush({})

    def batch(
        self,
        acc: torch.Tensor,
        views: dict[str, torch.Tensor],
        processed: list[OwnerPlan],
        samples: str,
    ) -> None:
        """Flag a non-finite accumulator after the batch of ``samples``; read the flags when due.

        A sum of nonnegative terms is finite exactly when every term is, so one reduction per
        batch replaces a check per layer; ``processed`` (the owners in the order their gradients
        arrived) names the layer if it fires.
        """
        self.pending.append(
            _Pending(~torch.isfinite(acc.sum()), samples, processed=tuple(processed))
        )
        self.batches += 1
        if self.batches % self.every == 0:
            self.flush(views)

    def flush(self, views: dict[str, torch.Tensor]) -> None:
        """Read every pending flag (one host sync) and raise for the first one set."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        flags = torch.stack([p.bad for p in pending]).tolist()
        first = next((p for p, bad in zip(pending, flags, strict=True) if bad), None)
        if first is None:
            return
        if first.labels is not None:
            raise first.labels.error(first.samples)
        if first.loss is not None:
            raise FloatingPointError(
                f"the loss is not finite ({first.loss.item()}) on the batch of samples "
                f"{first.samples}; check the inputs and the model"
            )
        for plan in first.processed:
            names = [plan.global_name(p) for p in plan.rule_params + plan.fallback_params]
            if any(n in views and not bool(torch.isfinite(views[n]).all()) for n in names):
                raise FloatingPointError(
                    f"the gradient at the output of {plan.name or 'the model'} "
                    f"({type(plan.module).__name__}) is not finite on samples {first.samples}: it "
                    "overflowed or divided by zero there or in a layer after it (check the loss, "
                    "the inputs and that layer)"
                )
        raise FloatingPointError(
            f"the Fisher accumulator became non-finite on samples {first.samples}"
        )
