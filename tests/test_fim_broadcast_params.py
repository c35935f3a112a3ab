"""Parameters broadcast over the samples by their module's own forward (a ViT's class token and
position embedding): given the sample axis when verified exact, else the generic path.

Every case is checked against a float64 per-sample loop; the uses that break the per-sample
reading of an expanded view (indexing its first axis, reducing over it) must be detected.
"""

from __future__ import annotations

import pytest
import torch
from fim_reference import reference_fim
from torch import nn

import fisher_fast
from fisher_fast.fim.broadcast_params import PATH

N, D = 7, 8


class TokenModel(nn.Module):
    """Patches, a class token, position embeddings added in the model's own forward; ``use``
    says how the position embedding enters (only "add" reads it per sample)."""

    def __init__(self, use: str = "add", blocks: int = 1) -> None:
        super().__init__()
        self.use = use
        self.patch = nn.Linear(4, D)
        self.cls_token = nn.Parameter(torch.randn(1, 1, D))
        self.pos_embed = nn.Parameter(torch.randn(1, 4, D))
        self.blocks = nn.ModuleList(Block() for _ in range(blocks))
        self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], 1)
        pos = {
            "add": lambda p: p,
            "index": lambda p: p[0],
            "sum": lambda p: p.sum(0, keepdim=True),
            "mean": lambda p: p.mean(0),
        }[self.use](self.pos_embed)
        h = h + pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)[:, 0])


class Block(nn.Module):
    """A residual block with a broadcast gain of its own, used twice per call."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(D, D)
        self.gain = nn.Parameter(torch.rand(1, 1, D) + 0.5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.gain * torch.tanh(self.mix(h))
        return h * self.gain


def _fim(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs: object
) -> fisher_fast.DiagFIM:
    return fisher_fast.diag_fim(
        model, (x, y), progress=False, dtype=torch.float64, batch_size=4, **kwargs
    )


def _data(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(N, 3, 4, generator=gen, dtype=torch.float64)
    return x, torch.randint(3, (N,), generator=gen)


@pytest.mark.parametrize("blocks", [0, 2])
def test_expanded_at_their_use_and_exact(blocks: int, gen: torch.Generator) -> None:
    """Batches of 4 and 3 samples; the blocks' gains are used twice per call (their
    per-sample gradients are summed over both uses before squaring)."""
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    model = TokenModel(blocks=blocks).double()
    x, y = _data(gen)
    fim = _fim(model, x, y)
    names = ["cls_token", "pos_embed"] + [f"blocks.{i}.gain" for i in range(blocks)]
    assert all(fim.meta["paths"][n] == PATH for n in names), fim.meta["paths"]
    reference = reference_fim(model, x, y)
    assert (fim.flat - reference).abs().max() <= 1e-10 * reference.abs().max()


@pytest.mark.parametrize("use", ["index", "sum", "mean"])
def test_uses_that_are_not_per_sample_are_detected(use: str, gen: torch.Generator) -> None:
    """Expanded whole, the position embedding would be read at row 0, or summed over the
    samples: the gradient check refuses that expansion (kept, it would be wrong), and the
    embedding is traced through the op to the addition instead."""
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    model = TokenModel(use).double()
    x, y = _data(gen)
    fim = _fim(model, x, y)
    assert fim.meta["paths"]["pos_embed"] == PATH
    reference = reference_fim(model, x, y)
    assert (fim.flat - reference).abs().max() <= 1e-10 * reference.abs().max()


@pytest.mark.parametrize("fisher", ["mc", "exact"])
def test_every_backward_pass_adds_its_squares(fisher: str, gen: torch.Generator) -> None:
    """One backward pass per class ("exact") or draw ("mc"): each adds its own squares."""
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    model = TokenModel(blocks=1).double()
    x, y = _data(gen)
    draws = fisher_fast.sample_labels(model(x), 2, torch.Generator().manual_seed(3))
    fim = fisher_fast.diag_fim(
        model, (x, y), fisher=fisher, mc_samples=2, generator=torch.Generator().manual_seed(3),
        dtype=torch.float64, progress=False, batch_size=N,
    )  # fmt: skip
    assert fim.meta["paths"]["cls_token"] == PATH
    reference = reference_fim(model, x, y, fisher=fisher, labels=draws)
    assert (fim.flat - reference).abs().max() <= 1e-10 * reference.abs().max()


@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("use", ["add", "index"])
def test_small_first_batches(use: str, batch_size: int, gen: torch.Generator) -> None:
    """The check's variant batch has at least two samples (copies of the one sample when the
    first batch has one), so it tells a per-sample use from another even then."""
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    model = TokenModel(use).double()
    x, y = _data(gen)
    fim = fisher_fast.diag_fim(
        model, (x, y), progress=False, dtype=torch.float64, batch_size=batch_size
    )
    assert fim.meta["paths"]["pos_embed"] == PATH  # "index": traced, as above
    reference = reference_fim(model, x, y)
    assert (fim.flat - reference).abs().max() <= 1e-10 * reference.abs().max()


class ScaledByAdapter(nn.Module):
    """A frozen Linear whose output and input are scaled by vectors kept in an
    nn.ParameterDict and an nn.ParameterList, as PEFT's IA3 layers keep theirs: the containers
    are never called, the layer reads them in its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(D, D).requires_grad_(False)
        self.scale = nn.ParameterDict({"default": nn.Parameter(torch.rand(D, 1) + 0.5)})
        self.shift = nn.ParameterList([nn.Parameter(torch.randn(D) * 0.3)])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (self.base(h + self.shift[0]) * self.scale["default"].flatten()).tanh()


def test_parameters_of_containers_are_traced_from_their_readers_call(
    gen: torch.Generator,
) -> None:
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    model = nn.Sequential(nn.Linear(4, D), ScaledByAdapter(), nn.Linear(D, 3)).double()
    x = torch.randn(N, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(3, (N,), generator=gen)
    fim = _fim(model, x, y)
    assert fim.meta["paths"]["1.scale.default"] == PATH
    assert fim.meta["paths"]["1.shift.0"] == PATH
    reference = reference_fim(model, x, y)
    assert float((fim.flat - reference).abs().max()) <= 1e-10 * float(reference.abs().max())
