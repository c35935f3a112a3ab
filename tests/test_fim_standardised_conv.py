"""Convolutions with weight standardisation (timm's StdConv2d / ScaledStdConv2d, Hugging Face's
WeightStandardizedConv2d), written here as those libraries write them: the rule only where the
layer's forward is verified to be the formula, and exact against a float64 per-sample loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from fim_reference import max_relative_error, reference_fim_batches
from torch import nn

import fisher_fast

N = 5
RULE = "rule standardised_conv_rule"


def _standardised(
    weight: torch.Tensor, eps: float, gain: torch.Tensor | None = None
) -> torch.Tensor:
    rows = weight.reshape(1, weight.shape[0], -1)
    scale = None if gain is None else gain.reshape(-1)
    out = F.batch_norm(rows, None, None, weight=scale, training=True, momentum=0.0, eps=eps)
    return out.reshape_as(weight)


class StdConv2d(nn.Conv2d):
    """timm's StdConv2d: the rows standardised by a training-mode batch norm."""

    def __init__(self, *args: object, eps: float = 1e-6, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _standardised(self.weight, self.eps)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """timm's ScaledStdConv2d (NF-ResNets): a learned gain per output channel times a constant."""

    def __init__(self, *args: object, eps: float = 1e-6, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.eps, self.scale = eps, self.weight[0].numel() ** -0.5
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _standardised(self.weight, self.eps, self.gain * self.scale)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class SamePad(nn.Module):
    """Hugging Face's DynamicPad2d: TensorFlow's "SAME" padding for the input's size."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in reversed(x.shape[2:]):
            total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)


class PaddedStdConv2d(nn.Conv2d):
    """Hugging Face's WeightStandardizedConv2d with its dynamic padding submodule."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int) -> None:
        super().__init__(cin, cout, kernel, stride=stride, bias=False)
        self.pad, self.eps = SamePad(kernel, stride), 1e-8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _standardised(self.weight, self.eps)
        return F.conv2d(self.pad(x), weight, None, self.stride, 0, self.dilation, self.groups)


class SamePadStdConv2d(StdConv2d):
    """timm's StdConv2dSame with ``same_pad``: the same padding, as a flag."""

    same_pad = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(SamePad(self.kernel_size[0], self.stride[0])(x))


class StdConv1d(nn.Conv1d):
    """A 1-D weight-standardised convolution."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _standardised(self.weight, self.eps)
        return F.conv1d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ColumnStdConv2d(StdConv2d):
    """Other math: standardised over the input channels (columns), not the rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _standardised(self.weight.transpose(0, 1), self.eps).transpose(0, 1)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Net(nn.Module):
    """conv -> ReLU -> conv (the tested layer, ``tested``) -> pooled linear head."""

    def __init__(
        self,
        tested: nn.Module,
        cin: int,
        cout: int,
        dims: int = 2,
        twice: bool = False,
        in_place: bool = False,
    ) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        self.stem, self.tested, self.twice = conv(3, cin, 3, padding=1), tested, twice
        self.in_place = in_place  # an activation applied to the tested layer's output in place
        self.head = nn.Linear(cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tested(torch.relu(self.stem(x)))
        if self.in_place:  # as NF-Nets do: the layer's kept output changes with it
            h = F.silu(h, inplace=True)
        if self.twice:  # the layer called again on its own output (weight sharing)
            h = self.tested(torch.relu(h))
        return self.head(h.flatten(2).mean(2))


CASES = {
    "std": lambda: Net(StdConv2d(4, 6, 3, padding=1, bias=True), 4, 6),
    "std_strided_dilated": lambda: Net(StdConv2d(4, 6, 3, stride=2, dilation=2, padding=2), 4, 6),
    "std_groups": lambda: Net(StdConv2d(4, 6, 3, padding=1, groups=2, bias=True), 4, 6),
    "std_called_twice": lambda: Net(StdConv2d(4, 4, 3, padding=1), 4, 4, twice=True),
    "scaled_with_gain": lambda: Net(ScaledStdConv2d(4, 6, 3, padding=1, bias=True), 4, 6),
    "scaled_then_in_place_silu": lambda: Net(
        ScaledStdConv2d(4, 6, 3, padding=1, bias=True), 4, 6, in_place=True
    ),
    "hf_dynamic_pad": lambda: Net(PaddedStdConv2d(4, 6, 3, stride=2), 4, 6),
    "timm_same_pad": lambda: Net(SamePadStdConv2d(4, 6, 4, stride=2, padding=0), 4, 6),
    "std_1d": lambda: Net(StdConv1d(4, 6, 3, padding=1, bias=True), 4, 6, dims=1),
    "std_depthwise": lambda: Net(StdConv2d(4, 4, 3, padding=1, groups=4), 4, 4),
}


@pytest.mark.parametrize("backend", ["kernels", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_standardised_convolutions_take_the_rule_and_are_exact(case: str, backend: str) -> None:
    """Both ways of summing the squared residuals: the CPU kernel, and unfolded chunks."""
    model = CASES[case]().double().eval()
    shape = (N, 3, 9) if case == "std_1d" else (N, 3, 9, 9)
    data = [(torch.randn(shape, dtype=torch.float64), torch.randint(0, 3, (N,))) for _ in range(2)]
    fim = fisher_fast.diag_fim(model, data, progress=False, dtype=torch.float64, backend=backend)
    tested = [name for name in fim.names if name.startswith("tested.")]
    assert {fim.meta["paths"][name] for name in tested} == {RULE}
    errors = max_relative_error(fim, reference_fim_batches(model, data))
    assert max(errors.values()) <= 1e-10, errors


def test_another_transform_keeps_the_generic_path() -> None:
    model = Net(ColumnStdConv2d(4, 6, 3, padding=1), 4, 6).double().eval()
    data = [(torch.randn(N, 3, 9, 9, dtype=torch.float64), torch.randint(0, 3, (N,)))]
    fim = fisher_fast.diag_fim(model, data, progress=False, dtype=torch.float64)
    assert fim.meta["paths"]["tested.weight"].startswith("per-sample gradients")
    errors = max_relative_error(fim, reference_fim_batches(model, data))
    assert max(errors.values()) <= 1e-10, errors


def test_float32_with_inputs_far_from_zero() -> None:
    """Each per-sample gradient is a residual after its row means are taken off: with inputs
    ten times their spread from zero, those means are ten times the residual. The float32
    result must stay within a plain float32 loop's rounding (each sample's mean is taken out of
    its input first; without that the error is 2 to 4 times the loop's)."""
    model = Net(ScaledStdConv2d(4, 6, 3, padding=1, bias=True), 4, 6).eval()
    with torch.no_grad():  # the stem's output: positive, with a large common offset
        model.stem.bias.add_(10.0)
    data = [(torch.randn(N, 3, 9, 9), torch.randint(0, 3, (N,))) for _ in range(2)]
    fim = fisher_fast.diag_fim(model, data, progress=False)
    assert fim.meta["paths"]["tested.weight"] == RULE
    reference = reference_fim_batches(model, data)
    error = max_relative_error(fim, reference)["tested.weight"]
    loop = reference_fim_batches(model, data, in_float64=False)
    loop_error = max_relative_error(loop, reference)["tested.weight"]
    assert error <= max(1e-6, 2 * loop_error), (error, loop_error)
