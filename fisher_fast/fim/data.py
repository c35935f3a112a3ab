"""Turning the ``data`` argument of diag_fim into (inputs, targets) batches."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

ACCEPTED_FORMS = (
    "a DataLoader or any iterable of (inputs, targets) batches; a tuple (X, y) of tensors, cut "
    "into batch_size batches; ({name: tensor}, y) or ((X1, X2, ...), y) for a model of several "
    "inputs; X or (X, None) without targets (fisher='mc' or 'exact')"
)


def batches(data: Any, batch_size: int) -> Iterator[tuple[Any, torch.Tensor | None]]:
    """Yield (inputs, targets) from a DataLoader, an iterable of batches, or a pair of tensors.

    A pair of tensors ``(X, y)`` is cut into batches of ``batch_size`` samples (views, no copy),
    and so are ``({name: tensor}, y)`` and ``((X1, X2), y)`` (tensors whose axis 0 has y's
    samples; others are shared); ``(X, None)`` or a bare tensor ``X`` means "no targets" (for
    the mc and exact kinds). A list ``[dict, y]`` or ``[X, None]`` is read as that pair too (no
    batch looks like it); a list ``[X, y]`` of two tensors of as many samples is refused, since
    it could be two batches as well as a pair: pass a tuple.
    """
    _check_batch_size(batch_size)
    pair = _as_pair(data)
    if pair is not None:
        yield from _cut(*pair, batch_size)
        return
    if isinstance(data, Mapping) or not isinstance(data, Iterable):
        raise TypeError(f"data is a {type(data).__name__}; diag_fim takes {ACCEPTED_FORMS}")
    for batch in data:
        if isinstance(batch, torch.Tensor):
            yield batch, None
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            yield batch[0], batch[1]
        else:
            raise TypeError(
                f"each batch must be (inputs, targets) or a tensor, got {type(batch).__name__}; "
                f"diag_fim takes {ACCEPTED_FORMS}"
            )


def _check_batch_size(batch_size: Any) -> None:
    try:
        whole = operator.index(batch_size)
    except TypeError:
        whole = 0
    if isinstance(batch_size, bool) or whole < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _as_pair(data: Any) -> tuple[Any, torch.Tensor | None] | None:
    """``data`` as one (inputs, targets) pair to cut into batches, or None for an iterable of
    batches; an ambiguous list is a ValueError."""
    if isinstance(data, torch.Tensor):
        return data, None
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        return None
    inputs, targets = data
    if not (targets is None or isinstance(targets, torch.Tensor)):
        return None
    if isinstance(inputs, Mapping) or (isinstance(inputs, torch.Tensor) and targets is None):
        return inputs, targets
    if isinstance(inputs, torch.Tensor) and targets is not None:
        if isinstance(data, tuple):
            return inputs, targets
        if inputs.dim() and targets.dim() and inputs.shape[0] == targets.shape[0]:
            raise ValueError(
                f"data is a list of two tensors of {inputs.shape[0]} samples, which reads "
                "both as two batches and as inputs and targets; pass a tuple (X, y) for inputs "
                f"and targets, or [(X1, y1), (X2, y2)] for batches (diag_fim takes "
                f"{ACCEPTED_FORMS})"
            )
        return None
    if isinstance(data, tuple) and isinstance(inputs, (tuple, list)) and targets is not None:
        tensors = [v for v in inputs if isinstance(v, torch.Tensor)]
        if tensors and all(v.dim() and v.shape[0] == targets.shape[0] for v in tensors):
            return inputs, targets  # ((X1, X2), y): one pair of a model with several inputs
    return None


def _cut(
    inputs: Any, targets: torch.Tensor | None, batch_size: int
) -> Iterator[tuple[Any, torch.Tensor | None]]:
    """Batches of ``batch_size`` samples of one (inputs, targets) pair (views, no copy)."""
    n = batch_size_of(inputs) if targets is None else targets.shape[0]
    if isinstance(inputs, torch.Tensor) and inputs.shape[0] != n:
        raise ValueError(f"inputs have {inputs.shape[0]} samples but targets have {n}")
    for start in range(0, n, batch_size):
        stop = start + batch_size
        yield _rows(inputs, start, stop, n), None if targets is None else targets[start:stop]


def _rows(inputs: Any, start: int, stop: int, n: int) -> Any:
    """Samples start..stop of a tensor, or of every tensor of a dict, tuple or list whose axis
    0 has the n samples (views, no copy); other entries are shared by all samples."""
    if isinstance(inputs, torch.Tensor):
        return inputs[start:stop]

    def rows(v: Any) -> Any:
        return v[start:stop] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v

    if isinstance(inputs, Mapping):
        return {k: rows(v) for k, v in inputs.items()}
    return type(inputs)(rows(v) for v in inputs)


def batch_size_of(inputs: Any) -> int:
    """Number of samples in a batch of inputs (a tensor, or a tuple/dict of tensors)."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0])
    values = inputs.values() if isinstance(inputs, dict) else inputs
    for v in values:
        if isinstance(v, torch.Tensor):
            return int(v.shape[0])
    raise TypeError("cannot tell the batch size: the inputs hold no tensor")


def take(inputs: Any, targets: torch.Tensor | None, count: int) -> tuple[Any, torch.Tensor | None]:
    """The first ``count`` samples of a batch (for max_samples)."""
    if isinstance(inputs, torch.Tensor):
        inputs = inputs[:count]
    elif isinstance(inputs, dict):
        inputs = {k: v[:count] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    else:
        inputs = type(inputs)(v[:count] if isinstance(v, torch.Tensor) else v for v in inputs)
    return inputs, None if targets is None else targets[:count]


def call_model(model: torch.nn.Module, inputs: Any) -> Any:
    """model(inputs), model(*inputs) for a tuple/list, model(**inputs) for a dict."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def devices_of(tree: Any) -> set[torch.device]:
    """Devices of all tensors in a (nested) batch."""
    from torch.utils._pytree import tree_flatten

    leaves, _ = tree_flatten(tree)
    return {v.device for v in leaves if isinstance(v, torch.Tensor)}
