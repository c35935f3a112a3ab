"""nn.Conv1d / Conv2d / Conv3d with stride, padding (numbers, "same", "valid"), padding modes,
dilation and groups.

Per sample and group, the weight gradient is G U^T with U the unfolded input (im2col):
(C_in/groups * prod(kernel), L) and G the output gradient (C_out/groups, L), L output positions.
Only the diagonal group blocks are formed, so a depthwise convolution costs no factor of groups.

1-D and 2-D layers called once go to a fused implementation that gathers the patches tile by
tile instead of building an im2col tensor: the op ``conv2d_sq_sum`` on CPU with the ``kernels``
backend, the Triton kernels of triton_conv.py with the ``triton`` backend. Otherwise samples are processed in small chunks, so the unfolded input (prod(kernel) times the
input) stays bounded and cache-friendly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fisher_fast import ops
from fisher_fast.fim import triton_conv
from fisher_fast.fim.rules import Call, RuleContext, joined, register_rule
from fisher_fast.fim.work_memory import work_bytes

# Patches of a few samples at a time on the CPU: small enough to stay in the allocator's reused
# heap (large fresh allocations are page-faulted in on every call), large enough to amortise the
# call cost; on a GPU, a share of the free memory (work_memory.py).
UNFOLD_CHUNK_BYTES = 4 * 2**20


def _explicit_padding(conv: nn.modules.conv._ConvNd) -> list[int]:
    """Per spatial dim (before, after) padding, "same" resolved as PyTorch does (extra at the end)."""
    pads: list[int] = []
    for d, (k, dil) in enumerate(zip(conv.kernel_size, conv.dilation, strict=True)):
        if conv.padding == "same":
            total = dil * (k - 1)
            pads += [total // 2, total - total // 2]
        elif conv.padding == "valid":
            pads += [0, 0]
        else:
            p = int(conv.padding[d])
            pads += [p, p]
    return pads


def _pad(conv: nn.modules.conv._ConvNd, x: torch.Tensor, pads: list[int]) -> torch.Tensor:
    """Pad explicitly (any padding mode; ``pads`` as from :func:`_explicit_padding`)."""
    if not any(pads):
        return x
    # F.pad takes the last dimension first.
    flipped = [v for d in reversed(range(len(pads) // 2)) for v in pads[2 * d : 2 * d + 2]]
    if conv.padding_mode == "zeros":
        return F.pad(x, flipped)
    return F.pad(x, flipped, mode=conv.padding_mode)


def unfold(conv: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) input -> (N, groups, L, C/groups * prod(kernel)) patches, weight order.

    1-D and 2-D use ATen's im2col (F.unfold; 1-D as a 2-D image of height 1) and return a
    transposed view of its (N, C*prod(kernel), L) result; 3-D builds the patches from strided
    windows. Zero padding that is the same on both sides is left to im2col.
    """
    n, spatial = x.shape[0], len(conv.kernel_size)
    pads = _explicit_padding(conv)
    symmetric = all(pads[2 * d] == pads[2 * d + 1] for d in range(spatial))
    if spatial <= 2:
        im2col_padding = pads[::2] if conv.padding_mode == "zeros" and symmetric else [0] * spatial
        if im2col_padding == [0] * spatial:
            x = _pad(conv, x, pads)
        as_2d = (lambda v: (1, v[0])) if spatial == 1 else tuple
        cols = F.unfold(
            x.unsqueeze(2) if spatial == 1 else x,
            kernel_size=as_2d(conv.kernel_size),
            dilation=as_2d(conv.dilation),
            padding=(0, im2col_padding[0]) if spatial == 1 else tuple(im2col_padding),
            stride=as_2d(conv.stride),
        )
        return cols.view(n, conv.groups, -1, cols.shape[-1]).transpose(2, 3)
    x = _pad(conv, x, pads)
    for d in range(spatial):
        k, s, dil = conv.kernel_size[d], conv.stride[d], conv.dilation[d]
        x = x.unfold(2 + d, dil * (k - 1) + 1, s)  # appends a window axis
        if dil > 1:
            x = x[..., ::dil]
    # x: (N, C, *out_spatial, *kernel) -> (N, *out_spatial, C, *kernel)
    out_axes = list(range(2, 2 + spatial))
    kernel_axes = list(range(2 + spatial, 2 + 2 * spatial))
    x = x.permute(0, *out_axes, 1, *kernel_axes)
    positions = math.prod(x.shape[1 : 1 + spatial])
    x = x.reshape(n, positions, conv.groups, -1)
    return x.transpose(1, 2)


def _grad_blocks(conv: nn.modules.conv._ConvNd, g: torch.Tensor) -> torch.Tensor:
    """(N, C_out, *out_spatial) -> (N, groups, L, C_out/groups)."""
    n = g.shape[0]
    return g.reshape(n, conv.groups, conv.out_channels // conv.groups, -1).transpose(2, 3)


FusedOp = Callable[..., torch.Tensor]  # the signature of ops.conv2d_sq_sum


def _fused_args(conv: nn.modules.conv._ConvNd, x: torch.Tensor, g: torch.Tensor) -> tuple:
    """The arguments of a fused op, ``(x, g, kernel, stride, padding, dilation, groups)``, as a
    2-D convolution with zero padding before the input.

    x: (N, C, *spatial) layer input, g: (N, C_out, *out_spatial) output gradient, 1-D or 2-D.
    Zero padding goes to the op as the count before the input (the output size implies the rest);
    other padding modes are applied here first.
    """
    pads = _explicit_padding(conv)
    before = pads[::2]
    if conv.padding_mode != "zeros":
        x, before = _pad(conv, x, pads), [0] * len(before)
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    if len(kernel) == 1:  # as a 2-D image of height 1
        x, g = x.unsqueeze(2), g.unsqueeze(2)
        kernel, stride, dilation, before = (1, *kernel), (1, *stride), (1, *dilation), [0, *before]
    return x, g, kernel, stride, before, dilation, conv.groups


def _fused_op(
    conv: nn.modules.conv._ConvNd, calls: int, x: torch.Tensor, ctx: RuleContext
) -> FusedOp | None:
    """The fused implementation for this layer and backend, or None for the chunked im2col path."""
    if calls != 1 or len(conv.kernel_size) > 2:
        return None
    if ctx.backend == "kernels" and x.device.type == "cpu":
        return ops.conv2d_sq_sum
    if ctx.backend == "triton":
        return functools.partial(triton_conv.conv2d_square_sum, precision=ctx.triton_precision)
    return None


def weight_square_sum(
    conv: nn.modules.conv._ConvNd,
    inputs: list[torch.Tensor],
    grads: list[torch.Tensor],
    ctx: RuleContext,
) -> torch.Tensor:
    """Sum over samples of the squared weight gradient of ``conv`` (its shape, ``ctx.acc_dtype``)
    for calls with these inputs (N, C, *spatial) and output gradients (N, C_out, *out_spatial),
    the gradient summed over the calls per sample."""
    op = _fused_op(conv, len(inputs), inputs[0], ctx)
    if op is not None:
        return op(*_fused_args(conv, inputs[0], grads[0]), ctx.acc_dtype).reshape(conv.weight.shape)
    n = inputs[0].shape[0]
    kernel = math.prod(conv.kernel_size)
    per_sample = sum(x[:1].numel() for x in inputs) * kernel * 4
    # At least two samples per thread, so the CPU kernel's threads all get work.
    budget = work_bytes(conv.weight.device, UNFOLD_CHUNK_BYTES)
    step = max(2 * torch.get_num_threads(), budget // max(1, per_sample))
    total = torch.zeros(conv.weight.shape, dtype=ctx.acc_dtype, device=conv.weight.device)
    for start in range(0, n, step):
        part = slice(start, start + step)
        x = joined([unfold(conv, x[part]) for x in inputs], dim=2)
        g = joined([_grad_blocks(conv, g[part]) for g in grads], dim=2)
        total += ctx.square_sum(g, x).reshape(conv.weight.shape)
    return total


def bias_square_sum(grads: list[torch.Tensor], ctx: RuleContext) -> None:
    """Add the bias's sum over samples of squared gradients, from the output gradients."""
    spatial = tuple(range(2, grads[0].dim()))
    per_sample = grads[0].to(ctx.work_dtype).sum(spatial)
    for g in grads[1:]:
        per_sample = per_sample + g.to(ctx.work_dtype).sum(spatial)
    ctx.add_bias("bias", per_sample)


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_rule(module: nn.modules.conv._ConvNd, calls: list[Call], ctx: RuleContext) -> None:
    inputs, grads = [c.input for c in calls], [c.grad() for c in calls]
    if module.weight.requires_grad:
        op = _fused_op(module, len(calls), inputs[0], ctx)
        target = ctx.target("weight") if op is ops.conv2d_sq_sum else None
        if target is not None and target.is_contiguous():
            # Straight into the running total: a weight-sized result, fresh memory on every
            # call, cost page faults of the order of the products on late layers.
            ops.conv2d_sq_sum_(target, *_fused_args(module, inputs[0], grads[0]))
        else:
            ctx.add("weight", weight_square_sum(module, inputs, grads, ctx))
    if module.bias is not None and module.bias.requires_grad:
        bias_square_sum(grads, ctx)
