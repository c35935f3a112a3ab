"""Catching host-device synchronisations on the CPU, where they cost nothing and so go unseen.

On a GPU, an op that reads a tensor's values on the host (``.item()``, ``int(t)``, ``bool(t)``,
``.tolist()``) or whose output shape depends on them (``nonzero``, ``unique``, a boolean mask
index, ``segment_reduce`` checking its lengths) waits for every kernel queued before it. Such
ops are found by what they are, not by where they run: ``NoHostSync`` is a dispatch mode that
raises :class:`HostSyncError` on each of them (torch tags most of them
``data_dependent_output`` or ``dynamic_output_shape``), and on copies between devices.
``SETTINGS``: models covering every built-in rule on the GPU's path, whose own forward passes
do not sync, to run diag_fim's per-batch path under it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten

_MASKABLE = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}
_MASKABLE |= {aten._index_put_impl_.default}
_MASK_DTYPES = (torch.bool, torch.uint8)


class HostSyncError(AssertionError):
    """An op that would make the host wait for the device."""


def sync_reason(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Why ``func`` on these arguments would wait for the device ("" when it would not)."""
    if func in _MASKABLE:
        masks = [i for i in args[1] if isinstance(i, torch.Tensor) and i.dtype in _MASK_DTYPES]
        return "indexes with a boolean mask (its count is read on the host)" if masks else ""
    if torch.Tag.data_dependent_output in func.tags:
        return "reads tensor values on the host"
    if torch.Tag.dynamic_output_shape in func.tags:
        return "has an output shape that depends on tensor values"
    lengths = kwargs.get("lengths") is not None
    if func is aten.segment_reduce.default and lengths and not kwargs.get("unsafe", False):
        return "checks its lengths on the host (pass unsafe=True)"
    if func in (aten._to_copy.default, aten.copy_.default):
        devices = {t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        devices |= {kwargs["device"]} if kwargs.get("device") is not None else set()
        if len({d.type for d in devices}) > 1:
            return "copies between the host and a device"
    return ""


class NoHostSync(TorchDispatchMode):
    """Raises :class:`HostSyncError` on every op that would wait for the device (see module doc)."""

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        why = sync_reason(func, args, kwargs)
        if why:
            raise HostSyncError(f"{func} {why}")
        return func(*args, **kwargs)


@contextmanager
def no_host_sync(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Within: ``NoHostSync``, and ``Tensor.tolist`` (which reads values without dispatching an
    op) raising too."""

    def tolist(self: torch.Tensor) -> Any:
        raise HostSyncError("Tensor.tolist reads tensor values on the host")

    with monkeypatch.context() as patch, NoHostSync():
        patch.setattr(torch.Tensor, "tolist", tolist)
        yield


# -- models whose per-batch path must not sync (each module's own forward does not) -------------
CLASSES = 5


class Tokens(nn.Module):
    """Every Embedding path: padding_idx, scale_grad_by_freq, a head tied to the input
    embedding, and broadcast positions (one id row for all samples, expanded by diag_fim)."""

    def __init__(self, vocab: int = 11, d: int = 4, length: int = 6) -> None:
        super().__init__()
        self.pad = nn.Embedding(vocab, d, padding_idx=0)
        self.freq = nn.Embedding(vocab, d, scale_grad_by_freq=True)
        self.embed = nn.Embedding(vocab, d)
        self.position = nn.Embedding(length, d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = self.position(torch.arange(ids.shape[1], device=ids.device)[None])
        hidden = self.embed(ids) + self.pad(ids) + self.freq(ids) + positions
        return self.out(torch.tanh(hidden).mean(1))[:, :CLASSES]


class Encoder(nn.Module):
    """Embedding, an encoder layer (instrumented attention, LayerNorm, Linear over positions),
    RMSNorm and a head."""

    def __init__(self, vocab: int = 11, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.encoder = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.encoder(self.embed(ids))).mean(1))


class Convolutions(nn.Module):
    """Conv2d, BatchNorm2d (eval), GroupNorm, Conv1d and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.conv1d = nn.Conv1d(4, 4, 3, groups=2)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gn(torch.relu(self.bn(self.conv(x)))).flatten(2)
        return self.head(self.conv1d(h).mean(2))


class TransposedLinear(nn.Module):
    """Two Hugging Face ``Conv1D`` layers (GPT-2's transposed Linear) over positions."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
        self.first, self.second = conv1d(8, d), conv1d(CLASSES, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x))).mean(1)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, CLASSES))


@dataclass(frozen=True)
class Setting:
    """A model, a builder of its inputs (N samples), and diag_fim's options."""

    id: str
    model: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], torch.Tensor]
    options: dict[str, Any] = field(default_factory=dict)


def _features(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(n, 4, generator=g, dtype=torch.float64)


def _ids(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 4, (n, 6), generator=g)  # few ids: repeats within each sample


SETTINGS = [
    Setting("linear-empirical", _mlp, _features),
    Setting("linear-mc", _mlp, _features, {"fisher": "mc", "mc_samples": 2}),
    Setting("linear-exact", _mlp, _features, {"fisher": "exact"}),
    Setting("embeddings", Tokens, _ids),
    Setting("encoder", Encoder, _ids),
    Setting("encoder-torch-backend", Encoder, _ids, {"backend": "torch"}),
    Setting(
        "convolutions",
        Convolutions,
        lambda n, g: torch.randn(n, 3, 5, 5, generator=g, dtype=torch.float64),
    ),
    Setting(
        "transposed-linear",
        TransposedLinear,
        lambda n, g: torch.randn(n, 3, 6, generator=g, dtype=torch.float64),
    ),
]
