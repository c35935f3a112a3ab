"""The per-sample square-accumulate ``sum_n (g[n,b]^T x[n,b])**2`` as a Triton kernel.

The ``triton`` backend of diag_fim (products.py). One program owns a (BLOCK_O × BLOCK_I) tile
of one block b of the output: for each sample it accumulates the tile of that sample's product
over the positions with ``tl.dot`` (tensor cores on a GPU), keeps it in registers, and squares
it into the accumulator when the sample ends; no per-sample product ever reaches memory, and
every output entry is summed over the samples in the same order (deterministic, no atomics).

Precision of the products (``PRECISIONS``, diag_fim's ``triton_precision``): ``"tf32"`` (inputs
rounded to TF32, 10-bit mantissa, products summed in float32: the fastest on tensor cores),
``"tf32x3"`` (each input split into a TF32 high and low part, three TF32 products: close to
float32's error at a fraction of float32's cost on tensor cores) or ``"ieee"`` (exact float32
without tensor cores). By default it follows torch's own flag for float32 matrix products:
``"tf32"`` when ``torch.backends.cuda.matmul.allow_tf32`` is set (the model's own products are
TF32 then), else ``"ieee"``. The squares are accumulated in float32, or in float64 for a float64
accumulator; float64 inputs are refused (use the ``kernels`` or ``torch`` backend, which compute
in float64). Triton's interpreter computes every product in float32 whatever the precision, so
the precisions differ only on a GPU.

Triton ships with CUDA builds of torch; with ``TRITON_INTERPRET=1`` (set before this module is
imported) the kernel runs on CPU tensors through Triton's interpreter, which is how it is
tested without a GPU (``make timm-check``'s second environment).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch do not ship Triton
    triton = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_T = 16  # tl.dot needs at least 16 along each axis
PRECISIONS = ("tf32", "tf32x3", "ieee")


def dot_precision(requested: str | None = None) -> str:
    """The products' precision: ``requested``, or by default the one torch's flag for float32
    matrix products implies (see the module docstring)."""
    if requested is not None:
        if requested not in PRECISIONS:
            raise ValueError(
                f"triton_precision must be one of {', '.join(map(repr, PRECISIONS))} or None; "
                f"got {requested!r}"
            )
        return requested
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def available() -> bool:
    """Whether Triton imports here."""
    return triton is not None


def runs_on(device: torch.device) -> bool:
    """Whether the kernel can run on tensors of ``device``: CUDA, or any under the interpreter."""
    return available() and (device.type == "cuda" or INTERPRETED)


def why_not(device: torch.device) -> str | None:
    """None when the kernel runs on ``device``, else the reason and the way out."""
    if not available():
        return (
            "backend='triton' needs Triton, which ships with CUDA builds of torch; install one, "
            "or use backend='kernels' or 'torch'"
        )
    if not runs_on(device):
        return (
            f"backend='triton' runs on CUDA tensors (here {device}); set TRITON_INTERPRET=1 "
            "before importing fisher_fast to run it on the CPU through Triton's interpreter "
            "(slow, for testing), or use backend='kernels' or 'torch'"
        )
    return None


def require(device: torch.device, acc_dtype: torch.dtype) -> None:
    """Refuse backend='triton' up front where it cannot run (before any batch is computed)."""
    reason = why_not(device)
    if reason is None and acc_dtype == torch.float64:
        reason = (
            "backend='triton' computes products in float32, so it cannot give a float64 FIM; "
            "use dtype=torch.float32, or backend='kernels' or 'torch' for float64"
        )
    if reason is not None:
        raise ValueError(reason)


if triton is not None:

    @triton.jit
    def _square_sum_kernel(
        g_ptr, x_ptr, out_ptr, n_samples, positions, out_features, in_features,
        g_sn, g_sb, g_st, g_so,
        x_sn, x_sb, x_st, x_si,
        out_sb, out_so, out_si,
        ACC_F64: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
    ):  # fmt: skip
        pid_o, pid_i, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
        offs_t = tl.arange(0, BLOCK_T)
        mask_o, mask_i = offs_o < out_features, offs_i < in_features
        acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float64 if ACC_F64 else tl.float32)
        for n in range(0, n_samples):
            product = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
            for t0 in range(0, positions, BLOCK_T):
                t = t0 + offs_t
                mask_t = t < positions
                g_tile = tl.load(
                    g_ptr + n * g_sn + b * g_sb + t[:, None] * g_st + offs_o[None, :] * g_so,
                    mask=mask_t[:, None] & mask_o[None, :],
                    other=0.0,
                )  # (BLOCK_T, BLOCK_O)
                x_tile = tl.load(
                    x_ptr + n * x_sn + b * x_sb + t[:, None] * x_st + offs_i[None, :] * x_si,
                    mask=mask_t[:, None] & mask_i[None, :],
                    other=0.0,
                )  # (BLOCK_T, BLOCK_I)
                product += tl.dot(tl.trans(g_tile), x_tile, input_precision=PRECISION)
            wide = product.to(acc.dtype)  # squared in the accumulator's precision
            acc += wide * wide
        out = out_ptr + b * out_sb + offs_o[:, None] * out_so + offs_i[None, :] * out_si
        tl.store(out, acc, mask=mask_o[:, None] & mask_i[None, :])


def square_sum(
    g: torch.Tensor, x: torch.Tensor, acc_dtype: torch.dtype, precision: str | None = None
) -> torch.Tensor:
    """(B, O, I) sum over samples of squared products g[n,b]^T x[n,b], for g (N, B, T, O) and
    x (N, B, T, I) in float32, bfloat16 or float16 (any strides); ``precision``: see
    :func:`dot_precision`."""
    reason = why_not(g.device)
    if reason is not None:
        raise RuntimeError(reason)
    if g.dtype == torch.float64 or x.dtype == torch.float64:
        raise TypeError(
            "backend='triton' computes products in float32 (or lower); for float64 inputs "
            "use backend='kernels' or 'torch'"
        )
    if g.dim() != 4 or x.dim() != 4 or g.shape[:3] != x.shape[:3] or g.device != x.device:
        raise ValueError(
            f"square_sum needs g (N, B, T, O) and x (N, B, T, I) on one device, got "
            f"{tuple(g.shape)} on {g.device} and {tuple(x.shape)} on {x.device}"
        )
    if acc_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the accumulator is float32 or float64, got {acc_dtype}")
    n, blocks, positions, out_f = g.shape
    in_f = x.shape[-1]
    if x.dtype != g.dtype:
        x = x.to(g.dtype)
    out = torch.empty(blocks, out_f, in_f, dtype=acc_dtype, device=g.device)
    block_o = 64 if out_f > 32 else 32
    block_i = 64 if in_f > 32 else 32
    grid = (triton.cdiv(out_f, block_o), triton.cdiv(in_f, block_i), blocks)
    precision = dot_precision(precision)
    _square_sum_kernel[grid](
        g, x, out, n, positions, out_f, in_f,
        *g.stride(), *x.stride(), *out.stride(),
        ACC_F64=acc_dtype == torch.float64, PRECISION=precision,
        BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_T=BLOCK_T,
    )  # fmt: skip
    return out
