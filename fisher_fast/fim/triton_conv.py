"""A 2-D convolution's sum of squared per-sample weight gradients as Triton kernels, no im2col.

The ``triton`` backend's convolution path (rules/conv.py); same contract as the CPU op
``ops.conv2d_sq_sum``: x (N, C, H, W) layer input, g (N, O, Ho, Wo) output gradient, zero padding
given as the count before the input (entries past either end read as zero), result
(groups, O/groups, C/groups * kh * kw).

* ``_implicit_gemm_kernel``: one program owns a (BLOCK_O × BLOCK_I) tile of one group's weight
  gradient; per sample it multiplies output-gradient tiles by input patches gathered straight
  from x by index arithmetic (masked loads give the padding), with ``tl.dot`` (tensor cores on a
  GPU), and squares the tile into the accumulator when the sample ends. Groups are a grid axis,
  so only the diagonal blocks are computed.
* ``_depthwise_kernel``: one input channel per group (depthwise and its channel multipliers),
  where a group's gradient is only (O/groups, kh * kw) and a matrix unit would idle; one program
  owns BLOCK_C output channels and every kernel offset, and reduces gradient × shifted input over
  the positions with vector arithmetic, reading each input once per kernel offset from cache.

Neither stores a per-sample product or a patch matrix; every entry is summed over the samples in
a fixed order (deterministic, no atomics). Where the tile grid is smaller than the GPU's SMs, a
grid axis splits the samples into contiguous ranges whose partial sums are added in a fixed order
afterwards, as in triton_products (``plan_splits``, ``sum_partials``). A sample's start and the
channel offsets are 64-bit; spatial offsets inside one channel plane stay 32-bit (a layout whose
height or width stride spans past 2^31 elements is copied contiguous first). Precision of the
matrix products as in triton_products (``dot_precision``: TF32, 3xTF32, exact float32 or
inputs rounded to bfloat16; bfloat16 inputs always take the bf16 products, ``kernel_precision``);
the depthwise kernel multiplies in float32 whatever the precision (vector arithmetic, no matrix
unit to feed). Squares accumulated in float32 or float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fisher_fast.fim.triton_products import (
    input_dtype,
    kernel_precision,
    plan_splits,
    sm_count,
    sum_partials,
    triton,
    why_not,
)

if triton is not None:
    import triton.language as tl

    from fisher_fast.fim.triton_products import tile_product

BLOCK_T = 16  # output positions per step of the implicit GEMM (tl.dot needs at least 16)
DEPTHWISE_TILE = 4096  # channels × positions × kernel offsets held per step of the depthwise kernel

if triton is not None:

    @triton.jit
    def _implicit_gemm_kernel(
        x_ptr, g_ptr, out_ptr, n_samples, per_split, groups, out_per_group, patch,
        in_per_group, height, width, out_width, positions,
        x_sn, x_sc, x_sh, x_sw,
        g_sn, g_sc, g_sh, g_sw,
        out_ss, out_sb, out_so, out_si,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
        ACC_F64: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
    ):  # fmt: skip
        pid_o, pid_i, pid_sb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, split = pid_sb % groups, pid_sb // groups
        first = split * per_split  # this program's samples: first .. first + count - 1
        count = tl.minimum(per_split, n_samples - first)
        offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
        offs_t = tl.arange(0, BLOCK_T)
        mask_o, mask_i = offs_o < out_per_group, offs_i < patch
        # Column i of the weight gradient is input channel c at kernel offset (ky, kx).
        c = offs_i // (KH * KW)
        ky = (offs_i // KW) % KH
        kx = offs_i % KW
        channel = (b * in_per_group + c).to(tl.int64) * x_sc
        g_channel = (b * out_per_group + offs_o).to(tl.int64) * g_sc
        acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float64 if ACC_F64 else tl.float32)
        x_n = x_ptr + first.to(tl.int64) * x_sn  # 64-bit, then advanced by a stride per sample
        g_n = g_ptr + first.to(tl.int64) * g_sn
        for _ in range(0, count):
            product = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
            for t0 in range(0, positions, BLOCK_T):
                t = t0 + offs_t
                mask_t = t < positions
                oy, ox = t // out_width, t % out_width
                g_tile = tl.load(
                    g_n + (oy * g_sh + ox * g_sw)[:, None] + g_channel[None, :],
                    mask=mask_t[:, None] & mask_o[None, :],
                    other=0.0,
                )  # (BLOCK_T, BLOCK_O)
                iy = (oy * SH - PH)[:, None] + (ky * DH)[None, :]
                ix = (ox * SW - PW)[:, None] + (kx * DW)[None, :]
                inside = (iy >= 0) & (iy < height) & (ix >= 0) & (ix < width)
                x_tile = tl.load(
                    x_n + iy * x_sh + ix * x_sw + channel[None, :],
                    mask=mask_t[:, None] & mask_i[None, :] & inside,
                    other=0.0,
                )  # (BLOCK_T, BLOCK_I): the patches of BLOCK_T positions, gathered
                product += tile_product(g_tile, x_tile, PRECISION)
            wide = product.to(acc.dtype)  # squared in the accumulator's precision
            acc += wide * wide
            x_n += x_sn
            g_n += g_sn
        out = (
            out_ptr + split.to(tl.int64) * out_ss + b * out_sb
            + offs_o[:, None] * out_so + offs_i[None, :] * out_si
        )  # fmt: skip
        tl.store(out, acc, mask=mask_o[:, None] & mask_i[None, :])

    @triton.jit
    def _depthwise_kernel(
        x_ptr, g_ptr, out_ptr, n_samples, per_split, out_channels, multiplier,
        height, width, out_width, positions,
        x_sn, x_sc, x_sh, x_sw,
        g_sn, g_sc, g_sh, g_sw,
        out_ss, out_so, out_sk,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
        ACC_F64: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # output channels
        split = tl.program_id(1)
        first = split * per_split  # this program's samples: first .. first + count - 1
        count = tl.minimum(per_split, n_samples - first)
        offs_t = tl.arange(0, BLOCK_T)
        offs_k = tl.arange(0, BLOCK_K)  # kernel offsets ky * KW + kx
        mask_c, mask_k = offs_c < out_channels, offs_k < KH * KW
        ky, kx = offs_k // KW, offs_k % KW
        # Output channel c reads input channel c // multiplier.
        x_channel = (offs_c // multiplier).to(tl.int64) * x_sc
        g_channel = offs_c.to(tl.int64) * g_sc
        acc = tl.zeros((BLOCK_C, BLOCK_K), dtype=tl.float64 if ACC_F64 else tl.float32)
        x_n = x_ptr + first.to(tl.int64) * x_sn  # 64-bit, then advanced by a stride per sample
        g_n = g_ptr + first.to(tl.int64) * g_sn
        for _ in range(0, count):
            product = tl.zeros((BLOCK_C, BLOCK_K), dtype=tl.float32)
            for t0 in range(0, positions, BLOCK_T):
                t = t0 + offs_t
                mask_t = t < positions
                oy, ox = t // out_width, t % out_width
                g_tile = tl.load(
                    g_n + g_channel[:, None] + (oy * g_sh + ox * g_sw)[None, :],
                    mask=mask_c[:, None] & mask_t[None, :],
                    other=0.0,
                ).to(tl.float32)  # (BLOCK_C, BLOCK_T)
                iy = (oy * SH - PH)[:, None] + (ky * DH)[None, :]  # (BLOCK_T, BLOCK_K)
                ix = (ox * SW - PW)[:, None] + (kx * DW)[None, :]
                inside = (iy >= 0) & (iy < height) & (ix >= 0) & (ix < width)
                at = (iy * x_sh + ix * x_sw)[None, :, :] + x_channel[:, None, None]
                valid = (mask_t[:, None] & mask_k[None, :] & inside)[None, :, :]
                x_tile = tl.load(x_n + at, mask=mask_c[:, None, None] & valid, other=0.0).to(
                    tl.float32
                )  # (BLOCK_C, BLOCK_T, BLOCK_K)
                product += tl.sum(g_tile[:, :, None] * x_tile, axis=1)
            wide = product.to(acc.dtype)  # squared in the accumulator's precision
            acc += wide * wide
            x_n += x_sn
            g_n += g_sn
        out = (
            out_ptr + split.to(tl.int64) * out_ss
            + offs_c[:, None] * out_so + offs_k[None, :] * out_sk
        )  # fmt: skip
        tl.store(out, acc, mask=mask_c[:, None] & mask_k[None, :])


def _check(
    x: torch.Tensor, g: torch.Tensor, kernel_size: Sequence[int], groups: int
) -> tuple[int, int]:
    """Refuse what the kernels cannot take, naming it; returns (C/groups, O/groups)."""
    reason = why_not(g.device)
    if reason is not None:
        raise RuntimeError(reason)
    if x.dtype == torch.float64 or g.dtype == torch.float64:
        raise TypeError(
            "backend='triton' computes products in float32 (or lower); for float64 inputs "
            "use backend='kernels' or 'torch'"
        )
    if x.dim() != 4 or g.dim() != 4 or x.shape[0] != g.shape[0] or x.device != g.device:
        raise ValueError(
            f"conv2d_square_sum needs x (N, C, H, W) and g (N, O, Ho, Wo) on one device, got "
            f"{tuple(x.shape)} on {x.device} and {tuple(g.shape)} on {g.device}"
        )
    if len(kernel_size) != 2 or groups < 1 or x.shape[1] % groups or g.shape[1] % groups:
        raise ValueError(
            f"conv2d_square_sum needs a 2-D kernel and groups dividing both channel counts, got "
            f"kernel {tuple(kernel_size)}, groups {groups}, C={x.shape[1]}, O={g.shape[1]}"
        )
    return x.shape[1] // groups, g.shape[1] // groups


def _planes_fit_int32(t: torch.Tensor) -> bool:
    """Whether every offset inside one channel plane of t (N, C, H, W) fits in 32 bits."""
    return (t.shape[2] - 1) * abs(t.stride(2)) + (t.shape[3] - 1) * abs(t.stride(3)) < 2**31


def conv2d_square_sum(
    x: torch.Tensor,
    g: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    acc_dtype: torch.dtype,
    precision: str | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """(groups, O/groups, C/groups * kh * kw) sum over samples of squared per-sample weight
    gradients of a 2-D convolution; arguments as for ``ops.conv2d_sq_sum`` (see module doc),
    ``precision`` as for ``triton_products.dot_precision`` (the depthwise kernel sums
    elementwise products in float32 whatever it is; two input dtypes: both in the wider),
    ``splits`` the sample ranges run side by side (None: ``triton_products.plan_splits`` from
    the tile count and the SM count)."""
    in_per_group, out_per_group = _check(x, g, kernel_size, groups)
    if acc_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the accumulator is float32 or float64, got {acc_dtype}")
    n, _, height, width = x.shape
    out_height, out_width = g.shape[2:]
    kh, kw = kernel_size
    patch = in_per_group * kh * kw
    out = torch.zeros(groups, out_per_group, patch, dtype=acc_dtype, device=g.device)
    if out.numel() == 0 or n == 0 or out_height * out_width == 0:
        return out
    dtype = input_dtype(g, x)
    x, g = x.to(dtype), g.to(dtype)
    x = x if _planes_fit_int32(x) else x.contiguous()
    g = g if _planes_fit_int32(g) else g.contiguous()
    geometry = dict(
        KH=kh, KW=kw, SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1],
        DH=dilation[0], DW=dilation[1], ACC_F64=acc_dtype == torch.float64,
    )  # fmt: skip
    positions = out_height * out_width
    shape = (height, width, out_width, positions)
    partial_bytes = out.numel() * out.element_size()
    sms = sm_count(g.device)
    if in_per_group == 1:
        block_k = triton.next_power_of_2(kh * kw)
        block_c = 16
        block_t = max(1, DEPTHWISE_TILE // (block_c * block_k))
        flat = out.view(groups * out_per_group, kh * kw)
        tiles = triton.cdiv(flat.shape[0], block_c)
        count, per_split = plan_splits(tiles, n, positions, partial_bytes, sms, splits)
        target = flat if count == 1 else flat.new_empty(count, *flat.shape)
        _depthwise_kernel[(tiles, count)](
            x, g, target, n, per_split, flat.shape[0], out_per_group, *shape,
            *x.stride(), *g.stride(), 0 if count == 1 else target.stride(0), *flat.stride(),
            **geometry, BLOCK_C=block_c, BLOCK_T=block_t, BLOCK_K=block_k,
        )  # fmt: skip
        if count > 1:
            sum_partials(target, flat)
        return out
    block_o = 64 if out_per_group > 32 else (32 if out_per_group > 16 else 16)
    block_i = 64 if patch > 32 else (32 if patch > 16 else 16)
    tiles_o, tiles_i = triton.cdiv(out_per_group, block_o), triton.cdiv(patch, block_i)
    count, per_split = plan_splits(
        tiles_o * tiles_i * groups, n, positions, partial_bytes, sms, splits
    )
    target = out if count == 1 else out.new_empty(count, *out.shape)
    _implicit_gemm_kernel[(tiles_o, tiles_i, groups * count)](
        x, g, target, n, per_split, groups, out_per_group, patch, in_per_group, *shape,
        *x.stride(), *g.stride(), 0 if count == 1 else target.stride(0), *out.stride(),
        **geometry, PRECISION=kernel_precision(precision, dtype),
        BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_T=BLOCK_T,
    )  # fmt: skip
    if count > 1:
        sum_partials(target, out)
    return out
