"""Convolutions with weight standardisation (timm's ``StdConv2d`` and ``ScaledStdConv2d``,
Hugging Face's ``WeightStandardizedConv2d``: BiT, ResNet-V2, ViT hybrids, NF-ResNets).

Such a layer convolves with W' = s ⊙ Ŵ, where each output channel's row of the weight is
standardised over its K = C_in/groups · prod(kernel) entries, Ŵ = (W - μ) / σ̃ with
σ̃ = sqrt(var + eps) (the biased variance, as ``F.batch_norm`` in training mode computes it),
and s is 1 or, for ``ScaledStdConv2d``, its ``gain`` (one per output channel) times its
``scale``. The transform has no sample in it, so with g_n the per-sample gradient at W' (what
the convolution rule squares), the per-sample gradient at W is, row by row, a layer norm's
backward:

    dW_n = (s / σ̃) (g_n - A_n - Ŵ B_n),   A_n = mean_e g_n,   B_n = mean_e (g_n ⊙ Ŵ),

with A_n and B_n one number per sample and output channel. Squared and summed over samples,

    Σ_n dW_n² = (s / σ̃)² (Σ_n g_n² - 2 Σ_n A_n g_n - 2 Ŵ Σ_n B_n g_n
                          + Σ_n A_n² + 2 Ŵ Σ_n A_n B_n + Ŵ² Σ_n B_n²),

where Σ_n g_n² is the convolution rule's sum of squares, Σ_n A_n g_n and Σ_n B_n g_n are
ordinary weight gradients of the convolution with the output gradient of sample n and channel
o scaled by A_n[o] (or B_n[o]), and A_n, B_n come from the output gradient and two cheap
convolutions: A_n[o] = Σ_p G_n[o,p] · S_n[p] / K with S_n[p] the sum of the input patch at
output position p (a convolution with a kernel of ones), and
B_n[o] = Σ_p G_n[o,p] · (x_n ⋆ Ŵ)[o,p] / K. No
per-sample gradient is formed. The gain's per-sample gradient is scale · K · B_n.

The expansion subtracts terms of the size of Σ_n g_n²; it loses precision only when the
per-sample gradients are nearly constant along each row (inputs with a mean far larger than
their spread), and the sums are combined in the accumulator's precision.

A module is recognised by its attributes (a convolution subclass with its own forward, an
``eps``, optionally a ``gain`` and ``scale``, and a padding of the input first: Hugging Face's
parameter-free ``pad`` submodule, or timm's ``same_pad``) and then verified: its own forward must reproduce the formula
on a random input (lookalike.py), so any other transform takes the exact generic path.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fisher_fast.fim.rules import Call, RuleContext, RuleSpec, register_matched_rule
from fisher_fast.fim.rules.conv import _explicit_padding, _pad, bias_square_sum, weight_square_sum
from fisher_fast.fim.rules.lookalike import reproduces

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_BASES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _same_pad(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """TensorFlow's "SAME" padding for this input size (timm's ``same_pad``): per spatial axis,
    enough zeros for ceil(size / stride) outputs, the odd one after."""
    pads: list[int] = []
    for size, k, s, d in zip(
        reversed(x.shape[2:]),
        reversed(module.kernel_size),
        reversed(module.stride),
        reversed(module.dilation),
        strict=True,
    ):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x


def _padded(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """The input as the layer's forward pads it before its convolution: by Hugging Face's
    parameter-free ``pad`` submodule, or by timm's ``same_pad``; else as it is."""
    pad = getattr(module, "pad", None)
    if isinstance(pad, nn.Module) and not any(True for _ in pad.parameters()):
        return pad(x)
    return _same_pad(module, x) if getattr(module, "same_pad", False) is True else x


def _gain(module: nn.modules.conv._ConvNd) -> torch.Tensor | None:
    """(C_out,) ``gain · scale`` of a scaled standardisation, without autograd, or None for
    plain."""
    gain = getattr(module, "gain", None)
    if not isinstance(gain, nn.Parameter):
        return None
    return gain.detach().reshape(-1) * float(getattr(module, "scale", 1.0))


def standardised(module: nn.modules.conv._ConvNd) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ŵ as (C_out, K), 1/σ̃ as (C_out, 1)) of the module's weight, without autograd (one
    training-mode batch norm of the rows, which returns both)."""
    w = module.weight.detach().reshape(1, module.out_channels, -1)
    eps = float(module.eps)  # type: ignore[arg-type]
    w_hat, _, inv_std = torch.ops.aten.native_batch_norm(w, None, None, None, None, True, 0.0, eps)
    return w_hat[0], inv_std.reshape(-1, 1)


def _reference(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """The layer's output by the formula: the convolution with s ⊙ Ŵ."""
    w_hat, _ = standardised(module)
    gain = _gain(module)
    weight = (w_hat if gain is None else w_hat * gain.reshape(-1, 1)).reshape(module.weight.shape)
    return _convolve(module, _padded(module, x), weight, module.bias)


def _convolve(
    module: nn.modules.conv._ConvNd,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    groups: int | None = None,
) -> torch.Tensor:
    """The module's convolution of x (its padding, stride, dilation) with another weight."""
    pads = _explicit_padding(module)
    conv = _CONV[len(module.kernel_size)]
    return conv(
        _pad(module, x, pads),
        weight,
        bias,
        module.stride,
        0,
        module.dilation,
        module.groups if groups is None else groups,
    )


def _is_standardised_conv(module: nn.Module) -> bool:
    """A Conv1d/2d/3d subclass with its own forward and a float ``eps``, whose forward is the
    convolution with its standardised weight (scaled by ``gain · scale`` if it has a gain)."""
    if not isinstance(module, _BASES) or type(module).forward in (b.forward for b in _BASES):
        return False
    if not isinstance(getattr(module, "eps", None), float) or module.transposed:
        return False
    gain = getattr(module, "gain", None)
    if gain is not None and (
        not isinstance(gain, nn.Parameter) or gain.numel() != module.out_channels
    ):
        return False
    spatial = tuple(
        d * (k - 1) + s + 3
        for k, s, d in zip(module.kernel_size, module.stride, module.dilation, strict=True)
    )
    shape = (2, module.in_channels, *spatial)
    return reproduces(
        module, "weight standardisation", lambda x: _reference(module, x), shape, sums=True
    )


def _patch_sums(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """(N, C_out, *out): per output channel, the sum of the input patch its row multiplies (the
    channels of the channel's group summed first, then a convolution with a kernel of ones)."""
    n, groups = x.shape[0], module.groups
    summed = x.reshape(n, groups, -1, *x.shape[2:]).sum(2)
    ones = torch.ones((groups, 1, *module.kernel_size), dtype=x.dtype, device=x.device)
    sums = _convolve(module, summed, ones, groups=groups)
    return sums.repeat_interleave(module.out_channels // groups, dim=1)


def _standardised_output(
    module: nn.modules.conv._ConvNd, call: Call, x: torch.Tensor, w_hat: torch.Tensor
) -> torch.Tensor:
    """(N, C_out, *out) the convolution of x with Ŵ: from the output the instrumented forward
    kept (minus the bias, over the scale), unless it was changed in place since, else computed."""
    output, version = call.saved.get("output"), call.saved.get("version")
    scale = _gain(module)
    changed = output is not None and output._version != version  # an in-place op after it
    if output is None or changed or (scale is not None and bool((scale == 0).any())):
        return _convolve(module, x, w_hat.to(x.dtype).reshape(module.weight.shape))
    shape = (1, -1, *(1,) * (output.dim() - 2))
    if module.bias is not None:
        output = output - module.bias.detach().to(output.dtype).reshape(shape)
    if scale is not None:
        output = output / scale.to(output.dtype).reshape(shape)
    return output


def _per_sample_rows(
    module: nn.modules.conv._ConvNd, call: Call, x: torch.Tensor, w_hat: torch.Tensor
) -> torch.Tensor:
    """(2, N, C_out): per sample and output channel, the mean over the row's K entries of the
    gradient at W' (A), and of that gradient times Ŵ (B)."""
    g = call.grad()
    spatial = tuple(range(2, g.dim()))
    a = (g * _patch_sums(module, x)).sum(spatial)
    b = (g * _standardised_output(module, call, x, w_hat)).sum(spatial)
    return torch.stack((a, b)) / w_hat.shape[1]


def _weighted_weight_grad(
    module: nn.modules.conv._ConvNd, x: torch.Tensor, g: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """(C_out, K) for weights (N, C_out): Σ_n weights[n, o] · (per-sample gradient at W' of
    sample n)[o], the weight gradient of the convolution with the output gradient scaled per
    sample and channel; x is already padded (``_centred_inputs``)."""
    spatial = (1,) * (g.dim() - 2)
    scaled = g * weights.to(g.dtype).reshape(*weights.shape, *spatial)
    weight = torch.empty(module.weight.shape, dtype=g.dtype, device=g.device)
    _, grad_weight, _ = torch.ops.aten.convolution_backward(
        scaled, x, weight, None, list(module.stride), [0] * len(spatial), list(module.dilation),
        False, [0] * len(spatial), module.groups, [False, True, False],
    )  # fmt: skip
    return grad_weight.reshape(module.out_channels, -1)


def _instrument(
    module: nn.modules.conv._ConvNd,
    call: Call,
    tap: Callable[[torch.Tensor], torch.Tensor],
    *args: Any,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The layer's own forward, its output kept (the convolution with Ŵ, scaled and shifted),
    so that the rule need not convolve again."""
    if len(args) != 1 or kwargs:
        return None
    output = type(module).forward(module, *args)
    tapped = tap(output)
    # the tap's alias shares the output's memory: an activation applied to it in place (an
    # NF-Net's) changes the kept output too, which the version counter tells
    call.saved["output"], call.saved["version"] = output.detach(), output._version
    return tapped


def _centred_inputs(
    module: nn.modules.conv._ConvNd, calls: list[Call]
) -> tuple[nn.modules.conv._ConvNd, list[torch.Tensor]]:
    """The calls' inputs padded as the layer pads them, minus each sample's mean over the
    channels of each group, and a copy of the layer without padding, to convolve them with.

    The per-sample gradient at W changes by nothing when every entry of a patch moves by the
    same amount (the row mean A absorbs it, and Ŵ's rows sum to zero), so this is exact; and an
    input far from zero would make each term of the expansion far larger than the result."""
    flat = copy.copy(module)  # shares the parameters; only its padding differs
    flat.padding, flat.padding_mode = (0,) * len(module.kernel_size), "zeros"
    inputs = []
    for c in calls:
        x = _pad(module, _padded(module, c.input), _explicit_padding(module))
        grouped = x.reshape(x.shape[0], module.groups, -1)
        centred = grouped - grouped.mean(2, keepdim=True)
        inputs.append(centred.reshape(x.shape))
    return flat, inputs


def _standardised_conv_rule(
    module: nn.modules.conv._ConvNd, calls: list[Call], ctx: RuleContext
) -> None:
    conv, inputs = _centred_inputs(module, calls)
    grads = [c.grad() for c in calls]
    gain = _gain(module)
    wants_weight = module.weight.requires_grad
    wants_gain = gain is not None and module.gain.requires_grad
    if wants_weight or wants_gain:
        acc = ctx.acc_dtype
        w_hat, inv_std = standardised(module)
        pairs = list(zip(calls, inputs, strict=True))
        rows = torch.stack([_per_sample_rows(conv, c, x, w_hat) for c, x in pairs]).sum(0)
        a, b = rows.to(acc)
        if wants_gain:
            scale = float(getattr(module, "scale", 1.0)) * w_hat.shape[1]
            ctx.add("gain", (scale * b).square().sum(0).reshape(module.gain.shape))
        if wants_weight:
            # Σ g² - 2 Σ A g - 2 Ŵ Σ B g + Σ A² + 2 Ŵ Σ A B + Ŵ² Σ B², one weight-sized
            # temporary at a time (these layers hold most of a ResNet-V2's parameters)
            w = w_hat.to(acc)
            total = weight_square_sum(conv, inputs, grads, ctx).reshape(w.shape).to(acc)
            for c, x in pairs:
                total.sub_(_weighted_weight_grad(conv, x, c.grad(), a).to(acc), alpha=2)
                total.addcmul_(w, _weighted_weight_grad(conv, x, c.grad(), b).to(acc), value=-2)
            quadratic = w * b.square().sum(0)[:, None]
            quadratic.add_((a * b).sum(0)[:, None], alpha=2).mul_(w).add_(
                a.square().sum(0)[:, None]
            )
            total.add_(quadratic)
            del quadratic
            s = inv_std.to(acc) if gain is None else inv_std.to(acc) * gain.to(acc)[:, None]
            # a sum of squares: only rounding can take it below zero
            ctx.add("weight", total.clamp_min_(0).mul_(s.square()).reshape(module.weight.shape))
    if module.bias is not None and module.bias.requires_grad:
        bias_square_sum(grads, ctx)


register_matched_rule(
    _is_standardised_conv, RuleSpec(_standardised_conv_rule, instrument=_instrument)
)
