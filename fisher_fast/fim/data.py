"""Turning the ``data`` argument of diag_fim into (inputs, targets) batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch


def batches(data: Any, batch_size: int) -> Iterator[tuple[Any, torch.Tensor | None]]:
    """Yield (inputs, targets) from a DataLoader, an iterable of batches, or a pair of tensors.

    A pair of tensors ``(X, y)`` is cut into batches of ``batch_size`` samples (views, no copy),
    and so is ``({name: tensor}, y)`` (tensors whose axis 0 has y's samples; others are shared);
    ``(X, None)`` or a bare tensor ``X`` means "no targets" (for the mc and exact kinds).
    """
    if isinstance(data, torch.Tensor):
        data = (data, None)
    if (
        isinstance(data, tuple)
        and len(data) == 2
        and isinstance(data[0], (torch.Tensor, dict))
        and (data[1] is None or isinstance(data[1], torch.Tensor))
    ):
        inputs, targets = data
        n = batch_size_of(inputs) if targets is None else targets.shape[0]
        if isinstance(inputs, torch.Tensor) and inputs.shape[0] != n:
            raise ValueError(f"inputs have {inputs.shape[0]} samples but targets have {n}")
        for start in range(0, n, batch_size):
            stop = start + batch_size
            yield _rows(inputs, start, stop, n), None if targets is None else targets[start:stop]
        return
    if not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a DataLoader, an iterable of (inputs, targets) batches or a pair of "
            f"tensors, got {type(data).__name__}"
        )
    for batch in data:
        if isinstance(batch, torch.Tensor):
            yield batch, None
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            yield batch[0], batch[1]
        else:
            raise TypeError(
                f"each batch must be (inputs, targets) or a tensor, got {type(batch).__name__}"
            )


def _rows(inputs: torch.Tensor | dict[str, Any], start: int, stop: int, n: int) -> Any:
    """Samples start..stop of a tensor, or of every tensor of a dict whose axis 0 has the n
    samples (views, no copy); other dict entries are shared by all samples."""
    if isinstance(inputs, torch.Tensor):
        return inputs[start:stop]
    return {
        k: v[start:stop] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
        for k, v in inputs.items()
    }


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
