"""Refuse a model whose output for one sample depends on the other samples of its batch.

The diagonal Fisher information is a mean over samples of squared gradients of *per-sample*
losses, each a function of its own sample. A model that mixes samples in its forward pass (a
layer that repeats a per-sample tensor with the wrong layout, as timm's GC ViT does with its
global query; BatchNorm in training mode, refused by name elsewhere) has no such losses: the
gradient of sample i's loss depends on which samples share its batch. diag_fim's rules would
then mix the batched gradients of some layers with per-sample re-runs of others, a number that
matches no definition, without a warning. So the first batch's planning compares the tensor the
loss is computed on, for the samples that the variant batch runs as a batch of their own
(layout.py): if their rows are not the same, the model is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fisher_fast.fim.layout import Recording, Unknown, compare


class CoupledSamplesError(ValueError):
    """The model's output for a sample depends on the other samples in its batch."""


def coupled_samples(
    model: nn.Module,
    real: Recording,
    variant: Recording,
    loss_input: Any,
    n: int,
    index: list[int],
) -> CoupledSamplesError | None:
    """The error to raise when ``loss_input`` (the tensor the loss is computed on, one of the
    model's outputs in the real pass of n samples) holds other values for samples ``index``
    than the variant pass, which ran those samples as a batch of their own; else None. The
    caller raises it only for a pass in which diag_fim gave no tensor the sample axis itself
    (an expanded parameter that the model sums over the batch couples the samples too)."""
    real_calls, variant_calls = real.calls.get(model, []), variant.calls.get(model, [])
    if len(real_calls) != 1 or len(variant_calls) != 1 or not isinstance(loss_input, torch.Tensor):
        return None
    outputs, others = real_calls[0].outputs, variant_calls[0].outputs
    at = next((k for k, t in enumerate(outputs) if t is loss_input), None)
    if at is None or len(others) != len(outputs):
        return None
    layout = compare(outputs[at], others[at], n, index)
    if not (isinstance(layout, Unknown) and layout.coupled):
        return None
    return CoupledSamplesError(
        f"the model's output for a sample depends on the other samples in its batch: run as a "
        f"batch of their own, samples {sorted(set(index))} of the first batch get other outputs "
        f"than in it ({layout.why}). The Fisher information is made of per-sample losses, "
        "which such a model does not have. Look for a layer that mixes samples (one that "
        "repeats or reshapes a per-sample tensor across the batch, a norm over the batch); fix "
        "it, or pass batch_size=1 to run every sample alone."
    )
