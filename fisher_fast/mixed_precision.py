"""Automatic mixed precision for the training loops: probes, FUSE, random search, final training.

``"fp32"`` (the default) trains in plain float32. ``"bf16"`` runs each training forward pass
under :func:`torch.autocast` in bfloat16: matrix products and convolutions in bfloat16, the
weights, the optimizer state and precision-sensitive ops (softmax, losses, norms) in float32.
``"fp16"`` does the same in float16, with a gradient scaler (:class:`torch.amp.GradScaler`) so
that small gradients do not underflow and steps with infinite gradients are skipped.

Only training steps change: evaluations, scores and every diagonal FIM (``diag_fim`` runs in
the dtype of the model) stay in float32, so a distance does not depend on this setting except
through the trained weights. bfloat16 is the choice on recent GPUs (no scaler, float32's
range); on CPUs autocast also works, mostly to test it, and is rarely faster.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
"""Accepted ``precision`` settings and the autocast dtype of each (None: no autocast)."""


def check_precision(precision: str) -> None:
    """Raise a clear error unless ``precision`` is one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(
            f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r} "
            "(fp32: plain float32; bf16 or fp16: automatic mixed precision)"
        )


class MixedPrecision:
    """Training steps of one optimizer at a ``precision`` of :data:`PRECISIONS`, on ``device``.

    Use :meth:`forward` around the forward pass and the loss, then :meth:`backward` and
    :meth:`step` in place of ``loss.backward()`` and ``optimizer.step()`` (gradients may be
    reduced over processes in between). One object per optimizer: the fp16 scaler adapts
    its scale to that optimizer's gradients.
    """

    def __init__(self, precision: str, device: torch.device | str) -> None:
        check_precision(precision)
        self.device_type = torch.device(device).type
        self.dtype = PRECISIONS[precision]
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=self.dtype is torch.float16)

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """The context of a training forward pass: autocast to the precision's dtype, or
        nothing at fp32."""
        if self.dtype is None:
            yield
            return
        with torch.autocast(self.device_type, dtype=self.dtype):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` (0-dim), scaled at fp16."""
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer's step on the gradients of :meth:`backward`: unscaled first at fp16,
        where a step whose gradients are not finite is skipped and the scale lowered."""
        if not self.scaler.is_enabled():
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()


def without_default_precision(settings: dict[str, object]) -> dict[str, object]:
    """``settings`` (a config's ``to_dict``) without its ``precision`` entry when that is the
    default ``"fp32"``: settings and cache keys written before the option existed stay equal."""
    if settings.get("precision") == "fp32":
        del settings["precision"]
    return settings
