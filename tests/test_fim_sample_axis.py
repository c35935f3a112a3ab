"""The sample axis is established, never assumed: synthetic modules for each way real models
break "axis 0 holds the samples", each against a float64 per-sample loop, and the layout
detection itself (fisher_fast/fim/layout.py) on hand-made tensors."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from fim_reference import max_relative_error, reference_fim_batches
from torch import nn

import fisher_fast
from fisher_fast.fim.coupled_samples import CoupledGradientsWarning
from fisher_fast.fim.layout import Broadcast, Sampled, Unknown, compare

N, T, D, C = 6, 4, 5, 3


class BucketTable(nn.Module):
    """A relative-position bias from an Embedding on a (T, T) bucket table: no sample axis."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.bias = nn.Embedding(2 * T, 1)
        self.head = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buckets = torch.arange(T)[:, None] - torch.arange(T)[None] + T - 1
        scores = self.proj(x) @ x.transpose(1, 2) + self.bias(buckets)[..., 0]
        return self.head((scores.softmax(-1) @ x).mean(1))


class BucketMix(BucketTable):
    """The same table, multiplied into the samples by a matrix product (not added to them)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buckets = torch.arange(T)[:, None] - torch.arange(T)[None] + T - 1
        mixed = self.bias(buckets)[..., 0].softmax(-1) @ self.proj(x)
        return self.head(mixed.mean(1))


class Windows(nn.Module):
    """Samples flattened with windows into axis 0: (N·W, T, D), as window attention does."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        w = x.reshape(n * 2, T // 2, D)  # two windows per sample
        h = self.norm(torch.tanh(self.inner(w))).reshape(n, T, D)
        return self.head(h.mean(1))


class Tokens(nn.Module):
    """A token-level layer on (N·T, D), as routers and expert layers use."""

    def __init__(self) -> None:
        super().__init__()
        self.expert = nn.Linear(D, D)
        self.head = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        h = torch.relu(self.expert(x.reshape(n * T, D))).reshape(n, T, D)
        return self.head(h.sum(1))


class TwoLayouts(nn.Module):
    """One projection on the tokens (N, T, D) and on a position table (1, 2T, D)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(1, 2 * T, D))
        self.proj = nn.Linear(D, D)
        self.head = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, positions = self.proj(x), self.proj(self.table)
        return self.head(
            tokens.mean(1) + (tokens @ positions.transpose(1, 2)).mean((1, 2))[:, None]
        )


class Mixture(nn.Module):
    """Mixture of experts with data-dependent dispatch (each sample to its argmax expert)."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(D, 2)
        self.experts = nn.ModuleList(nn.Linear(D, C) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.router(x).argmax(1)
        gate = self.router(x).softmax(1)
        out = torch.zeros(x.shape[0], C, dtype=x.dtype)
        for e, expert in enumerate(self.experts):
            mask = choice == e
            if mask.any():
                out[mask] = expert(x[mask]) * gate[mask, e : e + 1]
        return out


class ParameterOnly(nn.Module):
    """A bias computed from a parameter alone (a call without tensor inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.randn(C))

    def forward(self) -> torch.Tensor:
        return torch.tanh(self.logits)


class WithParameterOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.prior, self.head = ParameterOnly(), nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) * self.prior()


class WeightNormed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.utils.parametrizations.weight_norm(nn.Linear(D, D))
        self.head = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(x), x.sum(1)


class DictOut(TupleOut):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {"features": x, "logits": self.head(x)}


class _OldStyleSquare(torch.autograd.Function):
    """An autograd.Function without ``setup_context``, which torch.func transforms refuse."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class OldStyleFunction(nn.Module):
    """A layer whose parameter enters an old-style autograd.Function: vmap cannot run it, and
    its per-sample gradients come one sample at a time by plain backward passes."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.randn(D, D) / D)
        self.head = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(_OldStyleSquare.apply(x @ self.mix))


class TableAndFeatures(nn.Module):
    """Returns per-sample features and a table made from its parameter alone, which its parent
    then uses again: the table's gradient arrives summed over the samples."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, D) / D)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        table = torch.tanh(self.weight)
        return x @ table, table


class ReusedTable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.producer, self.head = nn.Linear(D, D), TableAndFeatures(), nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, table = self.producer(self.inp(x))
        return self.head(torch.tanh(features) @ table)


SEQUENCE_MODELS = [BucketTable, BucketMix, Windows, Tokens, TwoLayouts]
FLAT_MODELS = [
    Mixture, WithParameterOnly, WeightNormed, TupleOut, DictOut, ReusedTable, OldStyleFunction,
]  # fmt: skip


def _data(sequence: bool) -> list[tuple[Any, torch.Tensor]]:
    shape = (N, T, D) if sequence else (N, D)
    return [(torch.randn(shape, dtype=torch.float64), torch.randint(0, C, (N,))) for _ in range(2)]


@pytest.mark.parametrize("cls", SEQUENCE_MODELS + FLAT_MODELS, ids=lambda c: c.__name__)
def test_exact_on_every_layout(cls: type[nn.Module]) -> None:
    torch.manual_seed(random.randrange(2**31))
    model = cls().double().eval()
    data = _data(cls in SEQUENCE_MODELS)
    fim = fisher_fast.diag_fim(model, data, progress=False, dtype=torch.float64)
    logits = (lambda out: out[0]) if cls is TupleOut else None
    reference = reference_fim_batches(model, data, logits)
    errors = max_relative_error(fim, reference)
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] <= 1e-10, f"{worst}: {errors[worst]:.2e} via {fim.meta['paths'][worst]}"


def test_flattened_samples_keep_the_rules() -> None:
    """(N·W, T, D) and (N·T, D) calls are per sample in blocks: the rules still apply."""
    for cls, names in ((Windows, ["inner.weight", "norm.weight"]), (Tokens, ["expert.weight"])):
        paths = fisher_fast.diag_fim(cls().double().eval(), _data(True), progress=False).meta[
            "paths"
        ]
        assert all(paths[n].startswith("rule") for n in names), paths


def test_a_table_output_reused_later_goes_to_the_enclosing_module() -> None:
    """The producer's call is not per-sample separable: re-running it per sample would give
    each sample the gradient at the table summed over all samples."""
    model = ReusedTable().double().eval()
    paths = fisher_fast.diag_fim(model, _data(False), progress=False).meta["paths"]
    assert paths["producer.weight"] == "per-sample gradients of the model (ReusedTable)"


def test_a_bucket_table_is_traced_to_where_it_meets_the_samples() -> None:
    """The Embedding's rule cannot use a call without samples; its table is traced through the
    lookup to the scores it is added to, where it gets the sample axis."""
    paths = fisher_fast.diag_fim(BucketTable().double().eval(), _data(True), progress=False).meta[
        "paths"
    ]
    assert paths["bias.weight"] == "broadcast use expanded to the samples"
    assert paths["proj.weight"] == "rule linear_rule"


def test_a_call_without_samples_goes_to_the_enclosing_module() -> None:
    paths = fisher_fast.diag_fim(BucketMix().double().eval(), _data(True), progress=False).meta[
        "paths"
    ]
    assert paths["bias.weight"] == "per-sample gradients of the model (BucketMix)"
    assert paths["proj.weight"] == "rule linear_rule"


def test_output_picks_the_logits() -> None:
    model, data = TupleOut().double().eval(), _data(False)
    by_index = fisher_fast.diag_fim(model, data, output=0, progress=False)
    by_callable = fisher_fast.diag_fim(model, data, output=lambda out: out[0], progress=False)
    torch.testing.assert_close(by_index.flat, by_callable.flat, rtol=0, atol=0)
    keyed = DictOut().double().eval()
    keyed.load_state_dict(model.state_dict())
    by_key = fisher_fast.diag_fim(keyed, data, output="logits", progress=False)
    torch.testing.assert_close(by_key.flat, by_index.flat)
    with pytest.raises(KeyError, match="no such key or attribute"):
        fisher_fast.diag_fim(keyed, data, output="scores", progress=False)


def test_a_model_whose_output_mixes_samples_is_refused() -> None:
    class BatchMean(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(D, C)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x - x.mean(0))  # every sample's output depends on all the others

    with pytest.raises(ValueError, match=r"depends on the other samples in its batch"):
        fisher_fast.diag_fim(BatchMean().double(), _data(False), progress=False)


class _AttentionAcrossTheBatch(nn.Module):
    """CSATv2's pattern (timm): a LayerNorm over one channel returns its bias, the same for
    every sample, from which queries, keys and values of shape (N, T) attend across the batch
    ((N, N) logits). Every output is its sample's own; the gradients are not."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.norm = nn.Linear(D, 1), nn.LayerNorm(1)
        self.qkv, self.head = nn.Linear(1, 3, bias=False), nn.Linear(T, C)
        with torch.no_grad():
            self.norm.bias.fill_(0.7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(self.embed(x))).unbind(-1)  # (N, T) each
        return self.head((q @ k.transpose(0, 1)).softmax(-1) @ v)


def test_a_model_whose_gradients_mix_samples_is_rerun_whole_per_sample() -> None:
    """Silently wrong before (5e-3 relative on the norm's bias): the rules read each sample's
    gradient from its rows, where the other samples' losses reach too. Now the whole model is
    re-run per sample, with a warning that names where the gradients cross."""
    torch.manual_seed(random.randrange(2**31))
    model = _AttentionAcrossTheBatch().double()
    data = [(torch.randn(N, T, D, dtype=torch.float64), torch.randint(0, C, (N,)))]
    with pytest.warns(CoupledGradientsWarning, match=r"in the backward pass.*'qkv'"):
        fim = fisher_fast.diag_fim(model, data, progress=False, dtype=torch.float64)
    assert all(
        p.startswith("per-sample gradients of the model") for p in fim.meta["paths"].values()
    )
    errors = max_relative_error(fim, reference_fim_batches(model, data))
    assert max(errors.values()) <= 1e-12, errors


class _PositionsOfShape(nn.Embedding):
    """ProphetNet's position embedding: an nn.Embedding subclass called with the batch's shape
    (a torch.Size, no tensor), which gives it the batch's size. No rule applies, and a re-run
    of this call per sample would still make rows for the whole batch."""

    def forward(self, shape: torch.Size) -> torch.Tensor:  # type: ignore[override]
        return super().forward(torch.arange(shape[1]).expand(shape[0], -1))


class _WithPositionsOfShape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.positions, self.head = _PositionsOfShape(T, D), nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(x + self.positions(x.shape[:2])).mean(1))


def test_a_call_given_the_batch_size_as_a_number_goes_to_the_enclosing_module() -> None:
    """Before, the positions' own call was re-run per sample and failed inside autograd
    (output (N, T, D) for one sample's gradient (1, T, D))."""
    torch.manual_seed(random.randrange(2**31))
    model = _WithPositionsOfShape().double()
    data = _data(True)
    fim = fisher_fast.diag_fim(model, data, progress=False, dtype=torch.float64)
    assert fim.meta["paths"]["positions.weight"].startswith("per-sample gradients of the model")
    errors = max_relative_error(fim, reference_fim_batches(model, data))
    assert max(errors.values()) <= 1e-12, errors


def test_layout_detection() -> None:
    n, index = 4, [1, 0]
    x = torch.randn(n, 3, 2)
    assert compare(x, x[index], n, index) == Sampled(0, 1)
    seq = x.transpose(0, 1)
    assert compare(seq, seq[:, index], n, index) == Sampled(1, 1)
    flat = x.reshape(n * 3, 2)
    assert compare(flat, x[index].reshape(6, 2), n, index) == Sampled(0, 3)
    table = torch.randn(1, 5)
    assert compare(table, table.clone(), n, index) == Broadcast((1, 5))
    assert isinstance(compare(x.mean(0), x[index].mean(0), n, index), Unknown)  # a batch statistic
    window_major = x.transpose(0, 1).reshape(n * 3, 2)  # samples not one block each
    small = x[index].transpose(0, 1).reshape(6, 2)
    assert isinstance(compare(window_major, small, n, index), Unknown)
    assert isinstance(compare(x, x[[0, 1]], n, index), Unknown)  # not the variant's samples
    assert compare(3, 3, n, index) is None
    assert isinstance(compare(object(), object(), n, index), Unknown)  # may hold state
