"""Tensors with autograd history that a model keeps on its modules between calls (caches).

timm's LeViT, EfficientFormer (v1 and v2), EfficientViT (MSRA) and TinyViT gather their
attention biases from a parameter, in eval mode, once, into a dict (``attention_bias_cache``),
and read that dict in every later call. The kept value carries the parameter's gradient only
through the graph of the pass that computed it: in any later pass, and in a per-sample re-run of
the module (which differentiates with respect to a copy of the parameter), it is a constant,
and the parameter's entries would come out as zeros, without a warning. (Plain PyTorch fails
on such a model too, on its second backward pass in eval mode.) So the engine refuses a model
that holds one, before its first pass and after its planning pass, naming where it is kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def kept_with_history(model: nn.Module) -> list[str]:
    """The attributes of ``model``'s modules (not parameters, buffers or submodules) holding a
    tensor computed with autograd history, directly or in a dict, list or tuple, other than a
    view of a parameter's own memory (nn.LSTM's ``_flat_weights`` while diag_fim's instruments
    hold its weights)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    found = []
    for name, module in model.named_modules():
        internal = (module._parameters, module._buffers, module._modules)
        for attr, value in vars(module).items():
            if any(value is part for part in internal):
                continue
            if any(
                t.grad_fn is not None and t.untyped_storage().data_ptr() not in params
                for t in _tensors(value)
            ):
                found.append(f"{name}.{attr}" if name else attr)
    return found


class KeptHistoryError(ValueError):
    """The model keeps a tensor with autograd history between calls (module docstring)."""


def refuse_kept_history(model: nn.Module) -> None:
    """Raise a clear error when ``model`` keeps a tensor with autograd history between calls."""
    kept = kept_with_history(model)
    if kept:
        raise KeptHistoryError(
            f"the model keeps tensors computed with autograd history between calls, in "
            f"{', '.join(kept)} (a cache filled in eval mode, as timm's LeViT, EfficientFormer, "
            "EfficientViT and TinyViT keep their attention biases): gradients do not reach the "
            "parameters they were computed from in later passes, so diag_fim cannot be exact. "
            "Set `training = True` on the modules that keep them (the attribute alone, not "
            "`.train()`, which would reach their BatchNorm children too; where it changes "
            "nothing else in them), clear the cache, and call diag_fim with mode='keep'"
        )


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        yield from (v for v in value.values() if isinstance(v, torch.Tensor))
    elif isinstance(value, (list, tuple)):
        yield from (v for v in value if isinstance(v, torch.Tensor))
