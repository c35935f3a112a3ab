"""The settings of one diag_fim call, validated once, and the model output it differentiates."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fisher_fast.fim.losses import FISHER_KINDS, LossSpec
from fisher_fast.fim.triton_products import PRECISIONS

BACKENDS = ("auto", "kernels", "torch", "triton")
ON_UNSUPPORTED = ("fallback", "error", "skip")
OutputSpec = str | int | Callable[[Any], torch.Tensor] | None


@dataclass(frozen=True)
class FimOptions:
    """Every setting of diag_fim but the model and the data (see diag_fim's docstring)."""

    loss: LossSpec = "cross_entropy"
    fisher: str = "empirical"
    mc_samples: int = 1
    generator: torch.Generator | None = None
    max_samples: int | None = None
    dtype: torch.dtype = torch.float32
    backend: str = "auto"
    on_unsupported: str = "fallback"
    progress: bool = True
    batch_size: int = 256
    mode: str = "eval"
    output: OutputSpec = None
    triton_precision: str | None = None  # None: follow torch's TF32 flag (triton_products.py)
    reuse_plan: bool = True  # start from the plan of the last call on the model (plan_cache.py)

    def __post_init__(self) -> None:
        _check_choice("fisher", self.fisher, FISHER_KINDS)
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("on_unsupported", self.on_unsupported, ON_UNSUPPORTED)
        _check_choice("mode", self.mode, ("eval", "keep"))
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {self.dtype}")
        if self.mc_samples < 1:
            raise ValueError(f"mc_samples must be at least 1, got {self.mc_samples}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be at least 1, got {self.max_samples}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.triton_precision is not None:
            _check_choice("triton_precision", self.triton_precision, PRECISIONS)
        if not (
            self.output is None or isinstance(self.output, (str, int)) or callable(self.output)
        ):
            raise TypeError(
                "output must be None, a key or attribute name, a tuple index or a callable "
                f"(model output -> logits), got {type(self.output).__name__}"
            )


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def select_output(output: Any, spec: OutputSpec) -> torch.Tensor:
    """The tensor the loss is computed on, from whatever the model returned.

    ``spec=None``: a tensor as it is; an object with ``.logits`` (Hugging Face ``ModelOutput``)
    or a mapping with a ``"logits"`` key: that; a tuple or list: its first element. A string
    names a key or attribute, an int a tuple index, a callable maps the output to the tensor.
    """
    if callable(spec):
        chosen = spec(output)
    elif isinstance(spec, str):
        if isinstance(output, Mapping) and spec in output:
            chosen = output[spec]
        elif hasattr(output, spec):
            chosen = getattr(output, spec)
        else:
            raise KeyError(
                f"output={spec!r}: the model's output ({type(output).__name__}) has no such key or attribute"
            )
    elif isinstance(spec, int):
        if not isinstance(output, (tuple, list)):
            raise TypeError(
                f"output={spec}: the model returned {type(output).__name__}, not a tuple or list"
            )
        chosen = output[spec]
    elif isinstance(output, torch.Tensor):
        chosen = output
    elif isinstance(output, Mapping) and "logits" in output:
        chosen = output["logits"]
    elif not isinstance(output, Mapping) and getattr(output, "logits", None) is not None:
        chosen = output.logits
    elif isinstance(output, (tuple, list)) and output:
        chosen = output[0]
    else:
        raise TypeError(
            f"the model returned {type(output).__name__}, and diag_fim cannot tell which part is "
            "the prediction; pass output='logits' (a key or attribute), output=0 (a tuple index) "
            "or output=lambda out: ... (a callable returning the logits tensor)"
        )
    if not isinstance(chosen, torch.Tensor):
        raise TypeError(
            f"the selected model output is {type(chosen).__name__}, not a tensor; choose the "
            "logits with output=<key, index or callable>"
        )
    return chosen
