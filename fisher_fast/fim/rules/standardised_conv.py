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

with A_n and B_n one number per sample and output channel: dW_n is the residual of g_n after a
constant and a multiple of Ŵ are taken off each row. A_n and B_n come from the output gradient
and two cheap convolutions: A_n[o] = Σ_p G_n[o,p] · S_n[p] / K with S_n[p] the sum of the input
patch at output position p (a convolution with a kernel of ones), and
B_n[o] = Σ_p G_n[o,p] · (x_n ⋆ Ŵ)[o,p] / K, the second factor the layer's own output (kept by
the instrumented forward). The squared residuals are then summed as the convolution rule sums
squared gradients: on the CPU by the kernel ``conv2d_residual_sq_sum_``, which subtracts the
two terms from each tile of per-sample gradients before squaring it (no per-sample gradient is
stored); elsewhere from chunks of unfolded inputs. The gain's per-sample gradient is
scale · K · B_n.

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

from fisher_fast import ops
from fisher_fast.fim.rules import Call, RuleContext, RuleSpec, joined, register_matched_rule
from fisher_fast.fim.rules.conv import (
    UNFOLD_CHUNK_BYTES,
    _explicit_padding,
    _fused_args,
    _fused_op,
    _grad_blocks,
    _pad,
    bias_square_sum,
    unfold,
)
from fisher_fast.fim.rules.lookalike import reproduces
from fisher_fast.fim.work_memory import work_bytes

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


def _residual_square_sum(
    conv: nn.modules.conv._ConvNd,
    inputs: list[torch.Tensor],
    grads: list[torch.Tensor],
    factor: torch.Tensor,
    rows: torch.Tensor,
    w_hat: torch.Tensor,
    ctx: RuleContext,
) -> None:
    """Add Σ_n dW_n², dW_n = factor ⊙ (g_n - A_n - Ŵ B_n), for factor (C_out,) = s / σ̃, rows
    (2, N, C_out) = (A, B) and the calls' inputs (already padded: ``_centred_inputs``) and
    output gradients; g_n the per-sample gradient at W' summed over the calls.

    The factor goes into the output gradients (g_n is linear in them), so the residuals are
    dW_n themselves: one pass of the CPU kernel, which forms them tile by tile, or chunks of
    samples whose per-sample gradients are formed from the unfolded inputs."""
    spatial = (1,) * (grads[0].dim() - 2)
    scaled = [g * factor.to(g.dtype).reshape(-1, *spatial) for g in grads]
    shift, scale = rows * factor.to(rows.dtype)
    if _fused_op(conv, len(inputs), inputs[0], ctx) is not ops.conv2d_sq_sum:
        ctx.add(
            "weight", _unfolded_residual_square_sum(conv, inputs, scaled, shift, scale, w_hat, ctx)
        )
        return
    # straight into the running total when it can take it (as conv.py's rule)
    target = ctx.target("weight")
    if target is not None and not target.is_contiguous():
        target = None
    total = torch.zeros_like(conv.weight, dtype=ctx.acc_dtype) if target is None else target
    x, g, *geometry = _fused_args(conv, inputs[0], scaled[0])
    ops.conv2d_residual_sq_sum_(total, x, g, shift, scale, w_hat, *geometry)
    if target is None:
        ctx.add("weight", total)


def _unfolded_residual_square_sum(
    conv: nn.modules.conv._ConvNd,
    inputs: list[torch.Tensor],
    grads: list[torch.Tensor],
    shift: torch.Tensor,
    scale: torch.Tensor,
    w_hat: torch.Tensor,
    ctx: RuleContext,
) -> torch.Tensor:
    """The weight's Σ_n (g_n - shift_n - scale_n Ŵ)² (``ctx.acc_dtype``), shift and scale
    (N, C_out), per-sample gradients g_n formed from unfolded inputs a chunk of samples at a
    time (any device, any number of calls, 1-D to 3-D)."""
    work, out_ch = ctx.work_dtype, conv.out_channels
    basis = w_hat.to(work).reshape(1, out_ch, -1)
    per_sample = sum(x[:1].numel() for x in inputs) * math.prod(conv.kernel_size) + w_hat.numel()
    step = max(1, work_bytes(conv.weight.device, UNFOLD_CHUNK_BYTES) // (4 * per_sample))
    total = torch.zeros((out_ch, w_hat.shape[1]), dtype=ctx.acc_dtype, device=w_hat.device)
    for start in range(0, shift.shape[0], step):
        part = slice(start, start + step)
        x = joined([unfold(conv, x[part]) for x in inputs], dim=2).to(work)
        g = joined([_grad_blocks(conv, g[part]) for g in grads], dim=2).to(work)
        residual = (g.transpose(2, 3) @ x).reshape(x.shape[0], out_ch, -1)
        residual -= shift[part, :, None].to(work) + scale[part, :, None].to(work) * basis
        total += residual.square().sum(0, dtype=ctx.acc_dtype)
    return total.reshape(conv.weight.shape)


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
    input far from zero would make each g_n far larger than its residual, which float32 would
    then round."""
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
        pairs = zip(calls, inputs, strict=True)
        rows = torch.stack([_per_sample_rows(conv, c, x, w_hat) for c, x in pairs]).sum(0)
        if wants_gain:
            scale = float(getattr(module, "scale", 1.0)) * w_hat.shape[1]
            squares = (scale * rows[1].to(acc)).square().sum(0)
            ctx.add("gain", squares.reshape(module.get_parameter("gain").shape))
        if wants_weight:
            factor = inv_std.reshape(-1) if gain is None else inv_std.reshape(-1) * gain
            _residual_square_sum(conv, inputs, grads, factor, rows, w_hat, ctx)
    if module.bias is not None and module.bias.requires_grad:
        bias_square_sum(grads, ctx)


register_matched_rule(
    _is_standardised_conv, RuleSpec(_standardised_conv_rule, instrument=_instrument)
)
