"""diag_fim's API: data forms, options, DiagFIM, and a clear error for every kind of bad input."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from fim_reference import reference_fim, relative_error
from layer_models import SqrtHead
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fisher_fast
from fisher_fast.fim.run_context import AutocastIgnoredWarning


def _problem(n: int = 12, seed: int | None = None) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    seed = random.randrange(2**31) if seed is None else seed
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    return model, torch.randn(n, 4), torch.randint(0, 3, (n,))


def _fim(model: nn.Module, data: object, **kwargs: object) -> fisher_fast.DiagFIM:
    return fisher_fast.diag_fim(model, data, progress=False, **kwargs)  # type: ignore[arg-type]


def test_data_forms_agree() -> None:
    model, x, y = _problem()
    pair = _fim(model, (x, y), batch_size=5)
    loader = _fim(model, DataLoader(TensorDataset(x, y), batch_size=4))
    listed = _fim(model, [(x[:7], y[:7]), (x[7:], y[7:])])
    for other in (loader, listed):
        torch.testing.assert_close(other.flat, pair.flat, rtol=1e-5, atol=0)
    assert pair.n_samples == loader.n_samples == listed.n_samples == 12


def test_max_samples_uses_the_first_samples() -> None:
    model, x, y = _problem()
    partial = _fim(model, (x, y), batch_size=5, max_samples=7)
    assert partial.n_samples == 7
    torch.testing.assert_close(partial.flat, _fim(model, (x[:7], y[:7])).flat, rtol=1e-5, atol=0)


def test_eval_mode_is_used_and_restored() -> None:
    torch.manual_seed(random.randrange(2**31))
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    fim = _fim(model, (x, y))
    assert model.training and all(m.training for m in model.modules())
    assert relative_error(fim.flat, reference_fim(model, x, y)) < 2e-5  # the reference runs in eval


def test_mse_and_callable_losses() -> None:
    torch.manual_seed(random.randrange(2**31))
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    x, t = torch.randn(9, 4), torch.randn(9, 2)
    ref = reference_fim(model, x, t, loss="mse")
    assert relative_error(_fim(model, (x, t), loss="mse").flat, ref) < 2e-5

    def half_squared_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * (out - target).square().sum(1)

    assert relative_error(_fim(model, (x, t), loss=half_squared_error).flat, ref) < 2e-5


def test_mc_converges_to_exact() -> None:
    model, x, _ = _problem(n=40)
    exact = _fim(model, x, fisher="exact")
    mc = _fim(model, x, fisher="mc", mc_samples=400, generator=torch.Generator().manual_seed(1))
    assert relative_error(mc.flat, exact.flat.double()) < 0.1


@pytest.mark.usefixtures("rule_registry")
def test_custom_rule_is_used() -> None:
    class Gain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.randn(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.gain

    calls = []

    @fisher_fast.register_rule(Gain)
    def gain_rule(
        module: Gain, calls_: list[fisher_fast.Call], ctx: fisher_fast.RuleContext
    ) -> None:
        calls.append(len(calls_))
        ctx.add_bias("gain", sum(c.grad() * c.input for c in calls_))

    torch.manual_seed(random.randrange(2**31))
    model = nn.Sequential(Gain(), nn.Linear(4, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    fim = _fim(model, (x, y))
    assert calls, "the registered rule was not called"
    assert relative_error(fim.flat, reference_fim(model, x, y)) < 2e-5


def test_unsupported_parameters_error_lists_them_and_skip_leaves_them_out() -> None:
    class Mix(nn.Module):  # a matrix product: not an elementwise use that can be traced
        def __init__(self) -> None:
            super().__init__()
            self.mix = nn.Parameter(torch.eye(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.mix

    model = nn.Sequential(Mix(), nn.Linear(4, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match=r"0\.mix: no rule for Mix"):
        _fim(model, (x, y), on_unsupported="error")
    skipped = _fim(model, (x, y), on_unsupported="skip")
    assert skipped.names == ["1.weight", "1.bias"]


def test_diagfim_views_trace_normalized_combine() -> None:
    model, x, y = _problem()
    a, b = _fim(model, (x[:5], y[:5])), _fim(model, (x[5:], y[5:]))
    whole = _fim(model, (x, y))
    torch.testing.assert_close(a.combine(b).flat, whole.flat, rtol=1e-5, atol=0)
    assert a.combine(b).n_samples == 12
    assert math.isclose(float(whole.normalized().trace()), 1.0, rel_tol=1e-6)
    assert whole["2.weight"].shape == (3, 6)
    assert dict(whole.items()).keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert whole.to(dtype=torch.float64).flat.dtype == torch.float64
    # frechet_distance takes DiagFIMs directly and normalises inside.
    assert float(fisher_fast.frechet_distance(whole, whole.normalized())) < 1e-6
    assert 0 < float(fisher_fast.frechet_distance(a, b)) < 1


def test_save_load_round_trip_is_atomic(tmp_path: Path) -> None:
    model, x, y = _problem()
    fim = _fim(model, (x, y))
    path = tmp_path / "sub" / "fim.safetensors"
    fim.save(path)
    loaded = fisher_fast.DiagFIM.load(path)
    assert torch.equal(loaded.flat, fim.flat)
    assert (loaded.names, loaded.shapes, loaded.n_samples, loaded.fisher) == (
        fim.names,
        fim.shapes,
        12,
        "empirical",
    )
    assert loaded.meta["fisher_fast_version"] == fisher_fast.__version__
    assert [p.name for p in path.parent.iterdir()] == ["fim.safetensors"]  # no temporary left


def test_failed_save_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, x, y = _problem()
    fim = _fim(model, (x, y))
    path = tmp_path / "fim.safetensors"
    fim.save(path)
    before = path.read_bytes()

    def broken(*args: object, **kwargs: object) -> None:
        Path(args[1]).write_bytes(b"partial")  # type: ignore[arg-type]
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        fim.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["fim.safetensors"]


def test_corrupted_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(ValueError, match="not a readable DiagFIM file"):
        fisher_fast.DiagFIM.load(path)


# -- bad input --------------------------------------------------------------------------------


def test_labels_out_of_range() -> None:
    model, x, _ = _problem()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*from 0 to 3"):
        _fim(model, (x, torch.tensor([0, 1, 2, 3] * 3)))


def test_non_finite_loss() -> None:
    model, x, y = _problem()
    x[3, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="loss is not finite"):
        _fim(model, (x, y))


def test_non_finite_gradient_names_the_layer() -> None:
    model = SqrtHead()
    with torch.no_grad():
        model.body.weight.zero_()
        model.body.bias.zero_()
    with pytest.raises(FloatingPointError, match=r"output of body \(Linear\) is not finite"):
        _fim(model, (torch.randn(4, 4), torch.randint(0, 3, (4,))))


def test_illegal_in_place_change_of_a_layer_output_is_still_caught() -> None:
    """The captured output is an alias of the layer's own output (no copy): autograd must still
    see an in-place change to it after it was saved for the backward pass."""

    class SquareThenShift(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.body(x)
            squared = h * h  # saves h
            return squared + h.add_(1.0)

    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _fim(SquareThenShift(), (torch.randn(4, 4), torch.randint(0, 3, (4,))))


def test_empty_data() -> None:
    model, x, y = _problem()
    with pytest.raises(ValueError, match="data is empty"):
        _fim(model, [])
    with pytest.raises(ValueError, match="data is empty"):
        _fim(model, (x[:0], y[:0]))


def test_mismatched_devices() -> None:
    model, x, y = _problem()
    with pytest.raises(
        ValueError, match="the batch is on meta but the model's parameters are on cpu"
    ):
        _fim(model, (x.to("meta"), y.to("meta")))


def test_batchnorm_in_training_mode_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).train()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.raises(
        ValueError, match=r"BatchNorm layer in training mode.*per-sample gradients are not"
    ):
        _fim(model, (x, y), mode="keep")
    no_stats = nn.Sequential(
        nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.Linear(5, 3)
    )
    with pytest.raises(ValueError, match="without running statistics"):
        _fim(no_stats, (x, y))


class _WrongRepeat(nn.Module):
    """Adds each sample's mean token to its W tokens, but repeats the (N, C) means with the
    wrong layout: row r of the (N·W, C) tokens gets the mean of sample r mod N (as timm's GC
    ViT repeats its global query), so one sample's output depends on the others."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        n, w, c = h.shape
        mixed = h.reshape(n * w, c) + h.mean(1).repeat(w, 1)
        return self.head(torch.tanh(mixed).reshape(n, w, c).mean(1))


def test_a_model_that_mixes_samples_is_refused() -> None:
    torch.manual_seed(random.randrange(2**31))
    model = _WrongRepeat().double()
    x, y = torch.randn(6, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match="depends on the other samples in its batch"):
        _fim(model, (x, y), dtype=torch.float64, batch_size=3)
    one_by_one = _fim(model, (x, y), dtype=torch.float64, batch_size=1)  # the way out
    reference = reference_fim(model, x, y)
    assert (one_by_one.flat - reference).abs().max() <= 1e-10 * reference.abs().max()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fisher": "true"}, "fisher must be one of"),
        ({"backend": "cuda"}, "backend must be one of"),
        ({"on_unsupported": "ignore"}, "on_unsupported must be one of"),
        ({"dtype": torch.float16}, "dtype must be torch.float32 or torch.float64"),
        ({"mc_samples": 0}, "mc_samples must be at least 1"),
        ({"max_samples": 0}, "max_samples must be at least 1"),
        ({"loss": "hinge"}, "loss must be 'cross_entropy', 'mse' or a callable"),
    ],
)
def test_bad_options(kwargs: dict[str, object], match: str) -> None:
    model, x, y = _problem()
    with pytest.raises(ValueError, match=match):
        _fim(model, (x, y), **kwargs)


def test_no_trainable_parameters() -> None:
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        _fim(model, (torch.randn(2, 3), torch.tensor([0, 1])))


@pytest.mark.parametrize("fisher", ["exact", "mc"])
@pytest.mark.parametrize("backend", ["kernels", "torch"])
def test_a_float32_model_accumulated_in_float64_over_several_passes(
    fisher: str, backend: str, gen: torch.Generator
) -> None:
    """Several backward passes ("exact", "mc") sum the squared output gradients in the work
    dtype (float64 here) while the Linear's input stays float32: both reach the product."""
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    x, y = torch.randn(9, 6, generator=gen), torch.randint(4, (9,), generator=gen)
    draws = fisher_fast.sample_labels(model(x), 2, torch.Generator().manual_seed(1))
    fim = fisher_fast.diag_fim(
        model, (x, y), fisher=fisher, mc_samples=2, generator=torch.Generator().manual_seed(1),
        dtype=torch.float64, backend=backend, progress=False,
    )  # fmt: skip
    reference = reference_fim(model, x, y, fisher=fisher, labels=draws)
    assert relative_error(fim.flat, reference) <= 1e-5


def test_a_test_rule_does_not_outlive_its_test() -> None:
    """The rule registered by test_custom_rule_is_used went with its registry copy."""
    from fisher_fast.fim import rules

    assert all(spec.name != "gain_rule" for spec in rules._RULES.values())


def test_a_torch_compiled_model_and_block_run_eagerly_and_exactly() -> None:
    """Compiled code hides the module calls diag_fim hooks (Dynamo stops on them): it runs the
    modules' own code instead, with the names the model gives its parameters."""
    torch.manual_seed(random.randrange(2**31))
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(3, (10,))
    reference = reference_fim(model, x, y)
    compiled = torch.compile(model)
    fim = fisher_fast.diag_fim(compiled, (x, y), progress=False, dtype=torch.float64, batch_size=5)
    assert fim.names == [n for n, _ in compiled.named_parameters()]
    assert fim.names[0] == "_orig_mod.0.weight"
    assert relative_error(fim.flat, reference) <= 1e-12
    assert set(fim.meta["paths"].values()) == {"rule linear_rule"}
    model[0] = torch.compile(model[0])  # a compiled block inside
    fim = fisher_fast.diag_fim(model, (x, y), progress=False, dtype=torch.float64, batch_size=5)
    assert fim.names[:2] == ["0._orig_mod.weight", "0._orig_mod.bias"]
    assert relative_error(fim.flat, reference) <= 1e-12
    report = fisher_fast.check(compiled, (x, y), verbose=False)
    assert report.ok and report.reference == torch.float64


def test_under_autocast_the_model_runs_in_its_own_dtype_with_a_warning() -> None:
    """Under a caller's torch.autocast the products would run in bfloat16 against float32
    gradients (the rules' products refuse the mix): diag_fim switches it off inside and says
    so, and the FIM is the model's in its own dtype."""
    torch.manual_seed(random.randrange(2**31))
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(10, 6), torch.randint(3, (10,))
    plain = fisher_fast.diag_fim(model, (x, y), progress=False, batch_size=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.warns(AutocastIgnoredWarning, match="autocast of cpu"):
            fim = fisher_fast.diag_fim(model, (x, y), progress=False, batch_size=5)
        assert torch.is_autocast_enabled("cpu")  # restored on the way out
    assert torch.equal(fim.flat, plain.flat)
