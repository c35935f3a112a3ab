"""Backward objectives whose per-sample gradients, squared and summed, give each Fisher kind.

Each objective is sum_i w_i * l_i with per-sample weights folded in, so that for every sample
sum over objectives of (dl/dθ)^2 is that sample's Fisher contribution:

* empirical: one objective, the per-sample losses with the given labels (paper eq. 2);
* mc: k objectives with labels drawn from the model's predictive distribution, each scaled by
  1/sqrt(k), so the squares average over draws;
* exact: one objective per class c, -sqrt(p_c) log p_c, so the squares sum to
  sum_c p_c (d log p_c)^2 (for "mse", one per output with unit Gaussian noise: sum_c (d f_c)^2).

Conventions: "cross_entropy" takes logits (N, C) and integer labels (N,); "mse" takes outputs
(N, *) and targets of the same shape, with per-sample loss 0.5 * ||f - y||^2 (the negative log
likelihood of a unit-variance Gaussian, up to a constant); a callable takes (outputs, targets)
and returns one loss per sample, shape (N,), and supports the empirical kind only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LossSpec = str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
FISHER_KINDS = ("empirical", "mc", "exact")


def sample_labels(logits: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """(N, k) class labels drawn from softmax(logits), the draws of the "mc" kind."""
    probs = torch.softmax(logits.detach().to(torch.float32), dim=1)
    return torch.multinomial(probs, k, replacement=True, generator=generator)


@dataclass(frozen=True)
class LabelCheck:
    """Whether a batch's class labels lie in [0, classes), as tensors on the labels' device: the
    caller reads them when it chooses (each read waits for the device)."""

    outside: torch.Tensor  # 0-dim bool: some label is negative or not below ``classes``
    extremes: torch.Tensor  # (2,) the smallest and the largest label
    classes: int

    @classmethod
    def of(cls, targets: torch.Tensor, classes: int) -> LabelCheck:
        extremes = torch.stack([targets.min(), targets.max()])
        return cls((extremes[0] < 0) | (extremes[1] >= classes), extremes, classes)

    def error(self, samples: str | None = None) -> ValueError:
        """The error to raise when ``outside`` is set (reads ``extremes``)."""
        low, high = (int(v) for v in self.extremes.tolist())
        where = f" on the batch of samples {samples}" if samples is not None else ""
        return ValueError(
            f"labels must lie in [0, {self.classes}) for a model with {self.classes} outputs; "
            f"got labels from {low} to {high}{where}. Map the labels to the model's classes "
            "or widen its head."
        )


LabelSink = Callable[[LabelCheck], None]  # takes a batch's label check, to read later


def _check_classification(
    output: torch.Tensor, targets: torch.Tensor | None, need_targets: bool
) -> None:
    """The shapes and dtypes of logits and labels (host metadata only: their values are checked
    by ``_checked_labels``)."""
    if output.dim() != 2:
        raise ValueError(
            f"loss='cross_entropy' expects logits of shape (N, classes), got {tuple(output.shape)}; "
            "reshape the model output or pass a callable loss"
        )
    if not need_targets:
        return
    if targets is None:
        raise ValueError("fisher='empirical' needs targets: pass (inputs, targets) batches")
    if (
        targets.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        or targets.dim() != 1
    ):
        raise ValueError(
            f"cross_entropy targets must be integer labels of shape (N,), got {targets.dtype} {tuple(targets.shape)}"
        )


def _checked_labels(
    targets: torch.Tensor, classes: int, labels_to: LabelSink | None
) -> torch.Tensor:
    """The labels to compute the loss with. Without ``labels_to``, a label outside [0, classes)
    raises at once (one host read); with it, the check goes there unread, and the labels come
    back clamped into range, so that nothing indexes out of range before the caller reads the
    check (on CUDA such an index is a device assert); the caller must raise before using the
    result."""
    check = LabelCheck.of(targets, classes)
    if labels_to is None:
        if bool(check.outside):
            raise check.error()
        return targets
    labels_to(check)
    return targets.clamp(0, classes - 1)


def objectives(
    output: torch.Tensor,
    targets: torch.Tensor | None,
    loss: LossSpec,
    fisher: str,
    mc_samples: int,
    generator: torch.Generator | None,
    labels_to: LabelSink | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the scalar objectives to backpropagate, one backward pass each (see module doc).

    Given labels are checked against the classes at once, or, with ``labels_to``, handed to it
    as a :class:`LabelCheck` to read later (no host sync; see ``_checked_labels``)."""
    if callable(loss):
        if fisher != "empirical":
            raise ValueError(
                "a callable loss defines no predictive distribution: use fisher='empirical'"
            )
        per_sample = loss(output, targets)  # type: ignore[arg-type]
        if per_sample.shape != (output.shape[0],):
            raise ValueError(
                f"the loss callable must return one loss per sample, shape ({output.shape[0]},), got {tuple(per_sample.shape)}"
            )
        yield per_sample.sum()
    elif loss == "cross_entropy":
        _check_classification(output, targets, fisher == "empirical")
        if fisher == "empirical":
            assert targets is not None  # checked above
            labels = _checked_labels(targets, output.shape[1], labels_to)
            yield F.cross_entropy(output, labels, reduction="sum")
        elif fisher == "mc":
            labels = sample_labels(output, mc_samples, generator)
            for j in range(mc_samples):
                yield F.cross_entropy(output, labels[:, j], reduction="sum") / math.sqrt(mc_samples)
        else:
            log_p = torch.log_softmax(output, dim=1)
            weight = log_p.detach().exp().sqrt()
            for c in range(output.shape[1]):
                yield -(weight[:, c] * log_p[:, c]).sum()
    elif loss == "mse":
        flat = output.reshape(output.shape[0], -1)
        if fisher == "empirical":
            if targets is None or targets.shape != output.shape:
                raise ValueError(f"mse targets must have the output's shape {tuple(output.shape)}")
            yield 0.5 * (output - targets.to(output.dtype)).square().sum()
        elif fisher == "mc":
            for _ in range(mc_samples):
                noise = torch.randn(
                    flat.shape, generator=generator, device=flat.device, dtype=flat.dtype
                )
                yield (flat * noise).sum() / math.sqrt(mc_samples)
        else:
            for c in range(flat.shape[1]):
                yield flat[:, c].sum()
    else:
        raise ValueError(f"loss must be 'cross_entropy', 'mse' or a callable, got {loss!r}")
