"""The per-sample square-accumulate ``sum_n (g[n,b]^T x[n,b])**2`` as a Triton kernel.

The ``triton`` backend of diag_fim (products.py). One program owns a (BLOCK_O × BLOCK_I) tile
of one block b of the output: for each sample it accumulates the tile of that sample's product
over the positions with ``tl.dot`` (tensor cores on a GPU), keeps it in registers, and squares
it into the accumulator when the sample ends; no per-sample product ever reaches memory, and
every output entry is summed over the samples in the same order (deterministic, no atomics).

Precision of the products (``PRECISIONS``, diag_fim's ``triton_precision``): ``"tf32"`` (inputs
rounded to TF32, 10-bit mantissa, products summed in float32: fast on tensor cores),
``"tf32x3"`` (each input split into a TF32 high and low part, three TF32 products: close to
float32's error at a fraction of float32's cost on tensor cores), ``"ieee"`` (exact float32
without tensor cores) or ``"bf16"`` (inputs rounded to bfloat16, 8-bit significand, to nearest
with ties to even, as they are loaded, and multiplied on tensor cores at the BF16 rate with
float32 accumulation: twice TF32's rate, each input off by up to 2^-8 of itself). By default it
follows torch's own flag for float32 matrix products: ``"tf32"`` when
``torch.backends.cuda.matmul.allow_tf32`` is set (the model's own products are TF32 then), else
``"ieee"``. bfloat16 inputs (a bfloat16 model's tensors) take the bf16 products whatever the
precision: a product of two bfloat16 numbers is exact in float32, so every precision gives the
same sums, and these are the numbers the model's own weight gradient multiplies. The squares
are accumulated in float32, or in float64 for a float64 accumulator; float64 inputs are refused
(use the ``kernels`` or ``torch`` backend, which compute in float64).

Under Triton's interpreter every product is computed in float32 (numpy), so TF32 and 3xTF32
differ from exact float32 only on a GPU. The bf16 rounding is emulated there instead, so tests
see it: the interpreter's own float32 -> bfloat16 cast truncates and its ``tl.dot`` multiplies
bfloat16 operands as raw integer bit patterns, so under the interpreter the inputs are rounded
to bfloat16 by integer arithmetic (:func:`_round_to_bf16`, bit for bit the GPU's round to
nearest even) and multiplied as float32, which is exact for them; on a GPU they are cast with
``.to(tl.bfloat16)`` and ``tl.dot`` takes bfloat16 operands.

Samples split across the grid: the tile grid alone has (O/BLOCK_O)·(I/BLOCK_I)·B programs, a
handful for a small layer (a ResNet stem: 3) where a GPU has 132 SMs. When it is smaller than
the SMs, a grid axis splits the samples into S contiguous ranges (:func:`plan_splits`, from the
tile count and the SM count); each program squares and sums its range into a partial (S, B, O, I)
workspace (at most ``WORKSPACE_BYTES``) and ``_sum_partials_kernel`` adds the S partials in order
0..S-1: the same fixed order on every run, still no atomics. Which split is chosen depends on the
device's SM count (a fixed ``INTERPRETER_SMS`` under the interpreter), so a result is bitwise
repeatable on one kind of device; the ``splits`` argument forces a count.

Offsets: a sample's start is a 64-bit pointer (``first * g_sn`` in 64 bits, then advanced by a
stride per sample) and the row and column offsets inside a sample are 64-bit too, so N·T·O past
2^31 elements (a GPT-2 tied head, 768 × 50257 at T = 512, from N = 84 on) reads the right place.

Triton ships with CUDA builds of torch; with ``TRITON_INTERPRET=1`` (set before this module is
imported) the kernel runs on CPU tensors through Triton's interpreter, which is how it is
tested without a GPU (``make timm-check``'s second environment).
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch do not ship Triton
    triton = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_T = 16  # tl.dot needs at least 16 along each axis
PRECISIONS = ("tf32", "tf32x3", "ieee", "bf16")
INTERPRETER_SMS = 132  # the SM count assumed off CUDA (an H100's), so tests take a GPU's choices
SPLIT_WAVES = 2  # a split grid aims at this many programs per SM
MIN_SPLIT_POSITIONS = 128  # samples x positions per split, so its partial's store stays small
WORKSPACE_BYTES = 64 * 2**20  # bound on the partial sums of a split grid
SUM_BLOCK = 1024  # entries per program of _sum_partials_kernel


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


def kernel_precision(requested: str | None, dtype: torch.dtype) -> str:
    """The PRECISION a product kernel runs for inputs of ``dtype``: ``"bf16"`` for bfloat16
    inputs (exact products whatever was requested, and the only path by which the interpreter
    multiplies bfloat16 correctly: see the module docstring), else :func:`dot_precision`."""
    precision = dot_precision(requested)  # validates ``requested`` in every case
    return "bf16" if dtype == torch.bfloat16 else precision


def input_dtype(g: torch.Tensor, x: torch.Tensor) -> torch.dtype:
    """The dtype both inputs of a product kernel are given: the wider of the two (bfloat16 and
    float16 together: float32), so that no input is rounded before the kernel's own precision
    applies."""
    return torch.promote_types(g.dtype, x.dtype)


def operands(
    g: torch.Tensor, x: torch.Tensor, work: torch.dtype, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, x) as a rule hands them to ``square_sum`` on ``backend``: in ``work``, except a
    bfloat16 pair (a bfloat16 model's input and output gradient) on the triton backend, which
    stays as it is. The kernel multiplies those bfloat16 numbers exactly with float32
    accumulation, the products the model's own bfloat16 weight gradient sums (up to summation
    order); widening them first would change no product, only cost a copy and the BF16
    tensor-core rate. The other backends widen inside anyway."""
    if backend == "triton" and g.dtype == x.dtype == torch.bfloat16:
        return g, x
    return g.to(work), x.to(work)


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


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device``; ``INTERPRETER_SMS`` elsewhere."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def plan_splits(
    tiles: int,
    n_samples: int,
    positions: int,
    partial_bytes: int,
    sms: int,
    requested: int | None = None,
) -> tuple[int, int]:
    """(S, samples per split): S contiguous sample ranges for a grid of ``tiles`` programs.

    ``requested`` forces S (capped at ``n_samples``); otherwise S = 1 when the tiles fill the
    ``sms``, else enough splits for ``SPLIT_WAVES`` programs per SM, each split holding at least
    ``MIN_SPLIT_POSITIONS`` samples × positions and the S partials of ``partial_bytes`` each at
    most ``WORKSPACE_BYTES``. S is then lowered so that no range is empty (ceil(N / per) = S)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"splits must be a positive count of sample ranges, got {requested}")
        splits = requested
    elif tiles >= sms:
        splits = 1
    else:
        wanted = -(-SPLIT_WAVES * sms // tiles)
        by_work = n_samples * positions // MIN_SPLIT_POSITIONS
        by_memory = WORKSPACE_BYTES // max(1, partial_bytes)
        splits = min(wanted, by_work, by_memory)
    splits = max(1, min(splits, n_samples))
    per_split = -(-n_samples // splits)
    return -(-n_samples // per_split), per_split


if triton is not None:
    _EMULATE_BF16 = tl.constexpr(INTERPRETED)  # round and multiply bf16 as the interpreter can

    @triton.jit
    def _round_to_bf16(v):
        """float32 v rounded to the nearest bfloat16 (ties to even), kept as float32: what
        ``v.to(tl.bfloat16)`` gives on a GPU, in integer arithmetic that Triton's interpreter
        runs alike (its own cast truncates). Overflow gives infinity; NaN stays NaN."""
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(v == v, rounded.to(tl.float32, bitcast=True), v)

    @triton.jit
    def tile_product(g_tile, x_tile, PRECISION: tl.constexpr):
        """g_tile^T x_tile in float32 for tiles (BLOCK_T, BLOCK_O) and (BLOCK_T, BLOCK_I):
        ``tl.dot`` in ``PRECISION``, or for ``"bf16"`` on inputs rounded to bfloat16 (to nearest
        even) with float32 accumulation. Under the interpreter the rounded inputs stay float32
        and are multiplied as such, exactly (the module docstring says why)."""
        if PRECISION == "bf16":
            if _EMULATE_BF16:
                g_in = _round_to_bf16(g_tile.to(tl.float32))
                x_in = _round_to_bf16(x_tile.to(tl.float32))
            else:
                g_in = g_tile.to(tl.bfloat16)
                x_in = x_tile.to(tl.bfloat16)
            product = tl.dot(tl.trans(g_in), x_in, input_precision="ieee")
        else:
            product = tl.dot(tl.trans(g_tile), x_tile, input_precision=PRECISION)
        return product

    @triton.jit
    def _square_sum_kernel(
        g_ptr, x_ptr, out_ptr, n_samples, per_split, blocks, positions, out_features,
        in_features,
        g_sn, g_sb, g_st, g_so,
        x_sn, x_sb, x_st, x_si,
        out_ss, out_sb, out_so, out_si,
        ACC_F64: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
    ):  # fmt: skip
        pid_o, pid_i, pid_sb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, split = pid_sb % blocks, pid_sb // blocks
        first = split * per_split  # this program's samples: first .. first + count - 1
        count = tl.minimum(per_split, n_samples - first)
        offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
        offs_t = tl.arange(0, BLOCK_T)
        mask_o, mask_i = offs_o < out_features, offs_i < in_features
        cols_g = offs_o.to(tl.int64)[None, :] * g_so  # 64-bit: no offset wraps past 2^31
        cols_x = offs_i.to(tl.int64)[None, :] * x_si
        g_n = g_ptr + b.to(tl.int64) * g_sb + first.to(tl.int64) * g_sn
        x_n = x_ptr + b.to(tl.int64) * x_sb + first.to(tl.int64) * x_sn
        acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float64 if ACC_F64 else tl.float32)
        for _ in range(0, count):
            product = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
            for t0 in range(0, positions, BLOCK_T):
                t = t0 + offs_t
                mask_t = t < positions
                rows = t.to(tl.int64)[:, None]
                g_tile = tl.load(
                    g_n + rows * g_st + cols_g,
                    mask=mask_t[:, None] & mask_o[None, :],
                    other=0.0,
                )  # (BLOCK_T, BLOCK_O)
                x_tile = tl.load(
                    x_n + rows * x_st + cols_x,
                    mask=mask_t[:, None] & mask_i[None, :],
                    other=0.0,
                )  # (BLOCK_T, BLOCK_I)
                product += tile_product(g_tile, x_tile, PRECISION)
            wide = product.to(acc.dtype)  # squared in the accumulator's precision
            acc += wide * wide
            g_n += g_sn  # a 64-bit pointer advanced by one sample
            x_n += x_sn
        out = (
            out_ptr + split.to(tl.int64) * out_ss + b * out_sb
            + offs_o[:, None] * out_so + offs_i[None, :] * out_si
        )  # fmt: skip
        tl.store(out, acc, mask=mask_o[:, None] & mask_i[None, :])

    @triton.jit
    def _sum_partials_kernel(
        partials_ptr, out_ptr, count, splits, ACC_F64: tl.constexpr, BLOCK: tl.constexpr
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < count
        acc = tl.zeros((BLOCK,), dtype=tl.float64 if ACC_F64 else tl.float32)
        part = partials_ptr
        for _ in range(0, splits):  # split 0, 1, ..., S-1: one fixed order
            acc += tl.load(part + offs, mask=mask, other=0.0)
            part += count
        tl.store(out_ptr + offs, acc, mask=mask)


def sum_partials(partials: torch.Tensor, out: torch.Tensor) -> None:
    """out = partials[0] + partials[1] + ... in that order, for contiguous partials (S, *shape)
    and a contiguous out (*shape) of the same dtype (float32 or float64)."""
    if not (partials.is_contiguous() and out.is_contiguous()) or partials.dtype != out.dtype:
        raise ValueError("sum_partials needs contiguous partials and out of one dtype")
    count = out.numel()
    _sum_partials_kernel[(triton.cdiv(count, SUM_BLOCK),)](
        partials, out, count, partials.shape[0],
        ACC_F64=out.dtype == torch.float64, BLOCK=SUM_BLOCK,
    )  # fmt: skip


def square_sum(
    g: torch.Tensor,
    x: torch.Tensor,
    acc_dtype: torch.dtype,
    precision: str | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """(B, O, I) sum over samples of squared products g[n,b]^T x[n,b], for g (N, B, T, O) and
    x (N, B, T, I) in float32, bfloat16 or float16 (any strides; two dtypes: both in the wider,
    :func:`input_dtype`); ``precision``: see :func:`dot_precision` (bfloat16 inputs:
    :func:`kernel_precision`); ``splits``: sample ranges run side by side (None: chosen by
    :func:`plan_splits` from the tile count and the device's SM count)."""
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
    dtype = input_dtype(g, x)
    g, x = g.to(dtype), x.to(dtype)
    out = torch.empty(blocks, out_f, in_f, dtype=acc_dtype, device=g.device)
    if out.numel() == 0:
        return out
    if n == 0 or positions == 0:
        return out.zero_()
    block_o = 64 if out_f > 32 else 32
    block_i = 64 if in_f > 32 else 32
    tiles = (triton.cdiv(out_f, block_o), triton.cdiv(in_f, block_i), blocks)
    count, per_split = plan_splits(
        tiles[0] * tiles[1] * blocks, n, positions, out.numel() * out.element_size(),
        sm_count(g.device), splits,
    )  # fmt: skip
    target = out if count == 1 else out.new_empty(count, *out.shape)
    split_stride = 0 if count == 1 else target.stride(0)
    _square_sum_kernel[(tiles[0], tiles[1], blocks * count)](
        g, x, target, n, per_split, blocks, positions, out_f, in_f,
        *g.stride(), *x.stride(), split_stride, *out.stride(),
        ACC_F64=acc_dtype == torch.float64, PRECISION=kernel_precision(precision, dtype),
        BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_T=BLOCK_T,
    )  # fmt: skip
    if count > 1:
        sum_partials(target, out)
    return out
