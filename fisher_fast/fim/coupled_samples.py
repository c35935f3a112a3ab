"""Models whose samples depend on each other in their batch: refused when their outputs do,
re-run whole per sample when only their gradients do.

The diagonal Fisher information is a mean over samples of squared gradients of *per-sample*
losses, each a function of its own sample. A model that mixes samples in its forward pass (a
layer that repeats a per-sample tensor with the wrong layout, as timm's GC ViT does with its
global query; BatchNorm in training mode, refused by name elsewhere) has no such losses: the
gradient of sample i's loss depends on which samples share its batch. diag_fim's rules would
then mix the batched gradients of some layers with per-sample re-runs of others, a number that
matches no definition, without a warning. So the first batch's planning compares the tensor the
loss is computed on, for the samples that the variant batch runs as a batch of their own
(layout.py): if their rows are not the same, the model is refused.

Samples may also meet in the backward pass alone. timm's CSATv2 attends across the batch (its
logits are (batch, batch)) with queries, keys and values that are the same for every sample (a
LayerNorm over one channel returns its bias): every output is its sample's own, but one
sample's loss has a gradient at the other samples' rows. The rules read a sample's gradient
from its rows, so they would credit each sample with parts of the others' gradients. So the
planning batch also checks, on the variant batch, that a random gradient at the first
sample's outputs reaches no other sample's rows at the output of any module the plan reads
gradients from (``coupled_gradients``). Where it does, the per-sample losses still exist (the
outputs are each sample's own), so the model is not refused: it is planned again with every
parameter on the whole model's per-sample re-run (``WholeModelPerSample``), each sample alone,
which is exact and slower, with a ``CoupledGradientsWarning``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fisher_fast.fim.layout import CallLayout, Recording, Sampled, Unknown, compare

# Gradient at the other samples' rows allowed, relative to the largest entry: rows that no path
# joins get exact zeros, so this only spares rounding in a kernel that mixes rows.
_LEAK = 1e-6


class CoupledGradientsWarning(UserWarning):
    """The samples meet in the backward pass alone: the whole model is re-run per sample."""


class WholeModelPerSample(Mapping[nn.Module, "list[CallLayout | Unknown]"]):
    """``layouts`` with every call but the model's own unknown, so that the plan (plan.py)
    handles every parameter by the whole model's per-sample re-run."""

    def __init__(
        self, layouts: Mapping[nn.Module, list[CallLayout | Unknown]], model: nn.Module, why: str
    ) -> None:
        self._layouts, self._model, self._why = layouts, model, why

    def __getitem__(self, module: nn.Module) -> list[CallLayout | Unknown]:
        found = self._layouts[module]
        return found if module is self._model else [Unknown(self._why) for _ in found]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._layouts)

    def __len__(self) -> int:
        return len(self._layouts)


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


def coupled_gradients(
    model: nn.Module,
    variant: Recording,
    layouts: Callable[[nn.Module], list[CallLayout | Unknown]],
    owners: Sequence[tuple[str, nn.Module]],
) -> str | None:
    """Where, in the variant pass, a random gradient at the first sample's rows of the model's
    outputs reaches the rows of another sample at an output of one of ``owners`` (the
    modules, by name, whose calls the plan reads per-sample gradients from), described; else
    None. The variant's graph is kept (``retain_graph``) for the checks after this one."""
    root, root_layouts = variant.calls.get(model, []), layouts(model)
    if len(root) != 1 or not isinstance(root_layouts[0], CallLayout):
        return None
    generator = torch.Generator().manual_seed(0)
    objective: torch.Tensor | None = None
    for t, lay in zip(root[0].outputs, root_layouts[0].outputs, strict=True):
        if isinstance(lay, Sampled) and t.requires_grad and t.shape[lay.axis] > lay.k:
            first = t.narrow(lay.axis, 0, lay.k)
            v = torch.randn(first.shape, generator=generator, dtype=t.dtype).to(t.device)
            term = (first * v).sum()
            objective = term if objective is None else objective + term
    targets: list[tuple[str, torch.Tensor, Sampled]] = []
    for name, module in owners:
        for call, layout in zip(variant.calls.get(module, []), layouts(module), strict=False):
            if isinstance(layout, CallLayout):
                targets += [
                    (f"'{name}' ({type(module).__name__})", t, lay)
                    for t, lay in zip(call.outputs, layout.outputs, strict=True)
                    if isinstance(lay, Sampled) and t.requires_grad
                ]
    if objective is None or not targets:
        return None
    grads = torch.autograd.grad(
        objective, [t for _, t, _ in targets], retain_graph=True, allow_unused=True
    )
    leaks = [
        where
        for (where, _, lay), g in zip(targets, grads, strict=True)
        if g is not None and _leaks(g, lay)
    ]
    if not leaks:
        return None
    more = f" and {len(leaks) - 1} other module outputs" if len(leaks) > 1 else ""
    return (
        "the samples of a batch depend on each other in the backward pass: the gradient of one "
        f"sample's loss reaches the other samples' rows at the output of {leaks[-1]}{more} "
        "(attention across the batch, say, whose inputs happen to be the same for every sample)"
    )


def _leaks(grad: torch.Tensor, layout: Sampled) -> bool:
    """Whether ``grad`` is more than rounding at the rows after the first sample's."""
    rows = grad.shape[layout.axis]
    if rows <= layout.k:
        return False
    others = grad.narrow(layout.axis, layout.k, rows - layout.k)
    return float(others.abs().max()) > _LEAK * float(grad.abs().max())
