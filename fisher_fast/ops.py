"""Python entry points to the compiled ops, with their fake (meta) implementations.

The fake implementations give output shapes and dtypes without computing anything, so the ops
can be traced by ``torch.compile`` and checked by ``torch.library.opcheck``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fisher_fast import _library

FRECHET_COLUMNS = 5  # columns of frechet_sums' result; see csrc/fisher_fast.cpp


def _op(name: str) -> torch._ops.OpOverloadPacket:
    _library.require()
    return getattr(torch.ops.fisher_fast, name)


def frechet_sums(ref: Sequence[torch.Tensor], others: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sums behind the Fréchet distance of one FIM against K others, in one pass over the data.

    ``ref`` holds P contiguous tensors; ``others`` holds K * P, tensor p of FIM k at index
    ``k * P + p``. Returns a (K, 5) float64 tensor with columns: sum of ref, sum of other,
    sum of sqrt(ref * other), invalid entries in ref, invalid entries in other.
    """
    return _op("frechet_sums")(list(ref), list(others))


def per_sample_sq_sum(
    g: torch.Tensor, x: torch.Tensor, acc_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``out[b] = sum_n (g[n, b]^T x[n, b])**2`` without storing any per-sample product.

    g: (N, B, T, O) output gradients, x: (N, B, T, I) inputs. Returns (B, O, I) in ``acc_dtype``.
    """
    return _op("per_sample_sq_sum")(g, x, acc_dtype)


def per_sample_sq_sum_(acc: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> None:
    """In place (CPU only): ``acc += per_sample_sq_sum(g, x)`` in ``acc``'s dtype, with no result
    tensor of its own (a running total fills nothing fresh, so no new pages are touched).

    acc: contiguous float32 or float64 with B * O * I elements (any shape). diag_fim's linear
    rules still call ``per_sample_sq_sum``: on a GPT-2-style model with a tied head, adding in
    place measured slower in place of faster, for a reason not yet found.
    """
    _op("per_sample_sq_sum_")(acc, g, x)


def conv2d_sq_sum(
    x: torch.Tensor,
    g: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    acc_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sum over samples of a 2-D convolution's squared per-sample weight gradients (CPU only).

    x: (N, C, H, W) layer input, g: (N, O, Ho, Wo) gradient at the layer output. ``padding``
    counts the zero rows and columns before the input; entries past its end read as zero, and
    g's size must be the output size with as many zeros after the input, or one more (``'same'``
    padding of an even kernel reach). Every argument is checked (a RuntimeError names the wrong
    one). Returns (groups, O/groups, C/groups * kh * kw) in ``acc_dtype``, zeros when a dimension
    is empty; no im2col tensor is built.
    """
    return _op("conv2d_sq_sum")(
        x, g, list(kernel_size), list(stride), list(padding), list(dilation), groups, acc_dtype
    )


def conv2d_sq_sum_(
    acc: torch.Tensor,
    x: torch.Tensor,
    g: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> None:
    """In place: ``acc += conv2d_sq_sum(x, g, ...)`` in ``acc``'s dtype (CPU only), with no
    result tensor of its own.

    acc: contiguous float32 or float64 with the weight's O * C/groups * kh * kw elements (any
    shape, the weight's say).
    """
    _op("conv2d_sq_sum_")(
        acc, x, g, list(kernel_size), list(stride), list(padding), list(dilation), groups
    )


def conv2d_residual_sq_sum_(
    acc: torch.Tensor,
    x: torch.Tensor,
    g: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    basis: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> None:
    """In place (CPU only): ``acc += Σ_n R_n²`` with R_n the per-sample weight gradient of a 2-D
    convolution less, per output channel o, ``shift[n, o]`` and ``scale[n, o]`` times row o of
    ``basis``: ``R_n[o, k] = dW_n[o, k] - shift[n, o] - scale[n, o] · basis[o, k]``.

    x, g and the geometry as for :func:`conv2d_sq_sum`; shift and scale: (N, O); basis and acc:
    the weight's O * C/groups * kh * kw elements (any shape; acc contiguous float32 or float64).
    The per-sample gradients of a weight-standardised convolution are such residuals
    (``rules/standardised_conv.py``), formed tile by tile and never stored.
    """
    _op("conv2d_residual_sq_sum_")(
        acc, x, g, shift, scale, basis, list(kernel_size), list(stride), list(padding),
        list(dilation), groups,
    )  # fmt: skip


def linear_sq_sum_(
    weight_acc: torch.Tensor | None,
    bias_acc: torch.Tensor | None,
    g: torch.Tensor,
    x: torch.Tensor,
    g_squared: bool = False,
) -> None:
    """In place: ``weight_acc += (g∘g)ᵀ (x∘x)`` and ``bias_acc += (g∘g).sum(0)`` (CPU only).

    The sums over samples of a linear layer's squared per-sample gradients, for g: (N, O) output
    gradients and x: (N, I) inputs (any floating dtype). weight_acc (O, I) and bias_acc (O,) are
    float32 or float64 (the squares are taken in that type); either may be None. With
    ``g_squared``, g already holds g∘g (for instance summed over several backward passes). The
    squares go into a workspace the calling thread keeps between calls (at most 16 MiB; larger
    batches are taken in chunks of samples), so nothing the size of the batch is allocated.
    """
    _op("linear_sq_sum_")(weight_acc, bias_acc, g, x, g_squared)


# The fake implementations below check what the compiled kernels check, in the same order and
# with the same messages (csrc/cpu/*.cpp, csrc/include/fisher_fast/*checks.h), so that tracing
# refuses what running would refuse.

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# How c10 prints the dtypes that can reach a message.
_SCALAR_TYPE_NAMES = {
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.float32: "Float",
    torch.float64: "Double",
    torch.int64: "Long",
    torch.int32: "Int",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}
_GEOMETRY_RULE = "kernel_size, stride and dilation must be positive and padding nonnegative"


def _check(cond: bool, message: Callable[[], str]) -> None:
    torch._check(cond, lambda: f"fisher_fast: {message()}")


def _dtype_name(dtype: torch.dtype) -> str:
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype))


def _sizes(t: torch.Tensor) -> str:
    return str([int(v) for v in t.shape])


def _check_floating(t: torch.Tensor, name: str) -> None:
    _check(
        t.dtype.is_floating_point,
        lambda: f"{name} must be float16, bfloat16, float32 or float64, got {_dtype_name(t.dtype)}",
    )


def _check_contiguous(t: torch.Tensor, name: str) -> None:
    _check(t.is_contiguous(), lambda: f"{name} must be contiguous; call .contiguous() first")


def _check_same_device(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    _check(
        a.device == b.device,
        lambda: f"{name_a} is on {a.device} but {name_b} is on {b.device}; move both to one device",
    )


def _check_acc_dtype(acc_dtype: torch.dtype) -> None:
    _check(
        acc_dtype in (torch.float32, torch.float64),
        lambda: f"acc_dtype must be float32 or float64, got {_dtype_name(acc_dtype)}",
    )


def _check_inplace_acc(acc: torch.Tensor) -> None:
    """Mirror of FF_CHECK_ACCUMULATOR in csrc/include/fisher_fast/checks.h."""
    _check(
        acc.dtype in (torch.float32, torch.float64),
        lambda: f"acc must be float32 or float64, got {_dtype_name(acc.dtype)}",
    )
    _check_contiguous(acc, "acc")


def _checked(value: int, what: str, a: int, b: int, op: str) -> int:
    _check(
        _INT64_MIN <= value <= _INT64_MAX,
        lambda: f"{what} overflows int64 ({a} {op} {b}); the sizes are too large, use smaller ones",
    )
    return value


def _checked_mul(a: int, b: int, what: str) -> int:
    return _checked(a * b, what, a, b, "*")


def _checked_add(a: int, b: int, what: str) -> int:
    return _checked(a + b, what, a, b, "+")


def _check_fim_dtype(t: torch.Tensor, dtype: torch.dtype) -> None:
    _check(
        t.dtype == dtype,
        lambda: (
            "all FIM tensors must share one dtype; got "
            f"{_dtype_name(dtype)} and {_dtype_name(t.dtype)}"
        ),
    )


def _check_fim_numel(t: torch.Tensor, r: torch.Tensor, seg: int, fim: int) -> None:
    _check(
        t.numel() == r.numel(),
        lambda: (
            f"tensor {seg} of FIM {fim} has {t.numel()} elements but the reference has {r.numel()}"
        ),
    )


def _check_residual_term(t: torch.Tensor, name: str, x: torch.Tensor, g: torch.Tensor) -> None:
    """A per-(sample, output channel) term of conv2d_residual_sq_sum_: (N, O), floating, on x's
    device."""
    _check_floating(t, name)
    _check_same_device(t, x, name, "x")
    _check(
        t.dim() == 2 and tuple(t.shape) == tuple(g.shape[:2]),
        lambda: (
            f"{name} has shape {_sizes(t)} but g {_sizes(g)} needs (N, O) = "
            f"({g.shape[0]}, {g.shape[1]}): one value per sample and output channel"
        ),
    )


def _conv_out_size(size: int, pad: int, after: int, reach: int, stride: int) -> int:
    span = size + pad + after
    return 0 if span < reach else (span - reach) // stride + 1


def _check_conv_axis(
    d: int, size: int, out: int, kernel: int, stride: int, pad: int, dilation: int
) -> None:
    """Mirror of check_axis in csrc/cpu/conv_sq_cpu.cpp."""
    axis = "height" if d == 0 else "width"
    _check(kernel >= 1, lambda: f"kernel_size[{d}] is {kernel}; {_GEOMETRY_RULE}")
    _check(stride >= 1, lambda: f"stride[{d}] is {stride}; {_GEOMETRY_RULE}")
    _check(dilation >= 1, lambda: f"dilation[{d}] is {dilation}; {_GEOMETRY_RULE}")
    _check(pad >= 0, lambda: f"padding[{d}] is {pad}; {_GEOMETRY_RULE}")
    reach = _checked_add(
        _checked_mul(dilation, kernel - 1, "dilation * (kernel_size - 1)"),
        1,
        "the kernel's reach dilation * (kernel_size - 1) + 1",
    )
    _checked_add(
        _checked_add(
            _checked_add(size, pad, "input size + padding"),
            pad,
            "input size + padding on both sides",
        ),
        1,
        "input size + padding on both sides + 1",
    )
    lo = _conv_out_size(size, pad, pad, reach, stride)
    hi = _conv_out_size(size, pad, pad + 1, reach, stride)
    _check(
        lo <= out <= hi,
        lambda: (
            f"g has output {axis} {out}, but x's {axis} {size} with kernel_size[{d}] = {kernel}, "
            f"stride[{d}] = {stride}, padding[{d}] = {pad} and dilation[{d}] = {dilation} gives "
            f"an output {axis} from {lo} to {hi} (padding[{d}] zeros before the input, and as "
            "many or one more after it); pass the gradient of this convolution's output, or fix "
            "kernel_size, stride, padding and dilation"
        ),
    )


if _library.is_loaded():

    @torch.library.register_fake("fisher_fast::frechet_sums")
    def _frechet_sums_fake(ref: list[torch.Tensor], others: list[torch.Tensor]) -> torch.Tensor:
        n_seg = len(ref)
        _check(n_seg > 0, lambda: "the reference list is empty")
        _check(
            len(others) % n_seg == 0,
            lambda: (
                f"got {len(others)} tensors in 'others', which is not a multiple of the {n_seg} "
                "tensors in 'ref'; each other FIM needs one tensor per reference tensor"
            ),
        )
        dtype = ref[0].dtype
        for t in ref:
            _check_floating(t, "every FIM tensor")
            _check_fim_dtype(t, dtype)
            _check_contiguous(t, "every FIM tensor")
            _check_same_device(t, ref[0], "a reference tensor", "the first reference tensor")
        for i, t in enumerate(others):
            seg = i % n_seg
            r = ref[seg]
            _check_fim_dtype(t, dtype)
            _check_contiguous(t, "every FIM tensor")
            _check_same_device(t, r, "an 'other' tensor", "the reference")
            _check_fim_numel(t, r, seg, i // n_seg)
        k = len(others) // n_seg
        return ref[0].new_empty((k, FRECHET_COLUMNS), dtype=torch.float64)

    @torch.library.register_fake("fisher_fast::per_sample_sq_sum")
    def _per_sample_sq_sum_fake(
        g: torch.Tensor, x: torch.Tensor, acc_dtype: torch.dtype
    ) -> torch.Tensor:
        _check(
            g.dim() == 4 and x.dim() == 4,
            lambda: (
                "g and x must be 4-D (N, B, T, O) and (N, B, T, I); got "
                f"{_sizes(g)} and {_sizes(x)}"
            ),
        )
        _check(
            g.shape[:3] == x.shape[:3],
            lambda: f"g {_sizes(g)} and x {_sizes(x)} must agree in samples, blocks and positions",
        )
        _check_floating(g, "g")
        _check(g.dtype == x.dtype, lambda: "g and x must share one dtype")
        _check_acc_dtype(acc_dtype)
        _check_same_device(g, x, "g", "x")
        return g.new_empty((g.shape[1], g.shape[3], x.shape[3]), dtype=acc_dtype)

    @torch.library.register_fake("fisher_fast::per_sample_sq_sum_")
    def _per_sample_sq_sum_inplace_fake(
        acc: torch.Tensor, g: torch.Tensor, x: torch.Tensor
    ) -> None:
        _check_inplace_acc(acc)
        result = _per_sample_sq_sum_fake(g, x, acc.dtype)
        _check_same_device(acc, g, "acc", "g")
        _check(
            acc.numel() == result.numel(),
            lambda: (
                f"acc has {acc.numel()} elements but g {_sizes(g)} and x {_sizes(x)} give "
                f"{result.numel()} (B * O * I); pass an accumulator shaped like the result "
                "(B, O, I)"
            ),
        )

    @torch.library.register_fake("fisher_fast::conv2d_sq_sum")
    def _conv2d_sq_sum_fake(
        x: torch.Tensor,
        g: torch.Tensor,
        kernel_size: list[int],
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        groups: int,
        acc_dtype: torch.dtype,
    ) -> torch.Tensor:
        _check(
            x.dim() == 4 and g.dim() == 4,
            lambda: (
                "x and g must be 4-D (N, C, H, W) and (N, O, Ho, Wo); got "
                f"{_sizes(x)} and {_sizes(g)}"
            ),
        )
        _check(
            x.shape[0] == g.shape[0],
            lambda: f"x {_sizes(x)} and g {_sizes(g)} must have the same number of samples",
        )
        _check_floating(x, "x")
        _check(x.dtype == g.dtype, lambda: "x and g must share one dtype")
        _check_same_device(x, g, "x", "g")
        # The kernel is CPU-only; "meta" is the device of shape-only tensors.
        _check(x.device.type in ("cpu", "meta"), lambda: "conv2d_sq_sum runs on CPU tensors only")
        _check_acc_dtype(acc_dtype)
        _check(
            len(kernel_size) == 2 and len(stride) == 2 and len(padding) == 2 and len(dilation) == 2,
            lambda: "kernel_size, stride, padding and dilation must have two entries each",
        )
        channels, out_ch = x.shape[1], g.shape[1]
        _check(
            groups >= 1 and channels % groups == 0 and out_ch % groups == 0,
            lambda: (
                f"groups ({groups}) must divide the input channels ({channels}) and output "
                f"channels ({out_ch})"
            ),
        )
        for d in range(2):
            _check_conv_axis(
                d,
                x.shape[2 + d],
                g.shape[2 + d],
                kernel_size[d],
                stride[d],
                padding[d],
                dilation[d],
            )
        columns = _checked_mul(
            channels // groups,
            _checked_mul(kernel_size[0], kernel_size[1], "kernel_size[0] * kernel_size[1]"),
            "the weight columns C/groups * kernel_size[0] * kernel_size[1]",
        )
        _checked_mul(
            _checked_mul(out_ch, columns, "the result's size"), 8, "the result's size in bytes"
        )
        return x.new_empty((groups, out_ch // groups, columns), dtype=acc_dtype)

    @torch.library.register_fake("fisher_fast::conv2d_sq_sum_")
    def _conv2d_sq_sum_inplace_fake(
        acc: torch.Tensor,
        x: torch.Tensor,
        g: torch.Tensor,
        kernel_size: list[int],
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        groups: int,
    ) -> None:
        _check_inplace_acc(acc)
        args = (kernel_size, stride, padding, dilation, groups)
        result = _conv2d_sq_sum_fake(x, g, *args, acc.dtype)
        _check_same_device(acc, x, "acc", "x")
        _check(
            acc.numel() == result.numel(),
            lambda: (
                f"acc has {acc.numel()} elements but the weight of this convolution has "
                f"{result.numel()} (O = {g.shape[1]} times C/groups * kernel_h * kernel_w = "
                f"{result.shape[2]}); pass an accumulator shaped like the weight"
            ),
        )

    @torch.library.register_fake("fisher_fast::conv2d_residual_sq_sum_")
    def _conv2d_residual_sq_sum_fake(
        acc: torch.Tensor,
        x: torch.Tensor,
        g: torch.Tensor,
        shift: torch.Tensor,
        scale: torch.Tensor,
        basis: torch.Tensor,
        kernel_size: list[int],
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        groups: int,
    ) -> None:
        _conv2d_sq_sum_inplace_fake(acc, x, g, kernel_size, stride, padding, dilation, groups)
        _check_residual_term(shift, "shift", x, g)
        _check_residual_term(scale, "scale", x, g)
        _check_floating(basis, "basis")
        _check_same_device(basis, x, "basis", "x")
        _check(
            basis.numel() == acc.numel(),
            lambda: (
                f"basis has {basis.numel()} elements but the weight of this convolution has "
                f"{acc.numel()}; pass a tensor shaped like the weight"
            ),
        )

    @torch.library.register_fake("fisher_fast::linear_sq_sum_")
    def _linear_sq_sum_fake(
        weight_acc: torch.Tensor | None,
        bias_acc: torch.Tensor | None,
        g: torch.Tensor,
        x: torch.Tensor,
        g_squared: bool = False,
    ) -> None:
        _check(
            g.dim() == 2 and x.dim() == 2,
            lambda: f"g and x must be 2-D (N, O) and (N, I); got {_sizes(g)} and {_sizes(x)}",
        )
        _check(
            g.shape[0] == x.shape[0],
            lambda: f"g {_sizes(g)} and x {_sizes(x)} must have the same number of samples",
        )
        _check_floating(g, "g")
        _check(g.dtype == x.dtype, lambda: "g and x must share one dtype")
        _check_same_device(g, x, "g", "x")
        _check(
            weight_acc is not None or bias_acc is not None,
            lambda: "give weight_acc, bias_acc or both: there is nothing to accumulate",
        )
        some = weight_acc if weight_acc is not None else bias_acc
        assert some is not None
        _check(
            some.dtype in (torch.float32, torch.float64),
            lambda: f"the accumulators must be float32 or float64, got {_dtype_name(some.dtype)}",
        )
        _check_same_device(some, g, "the accumulator", "g")
        if weight_acc is not None:
            _check(
                weight_acc.shape == (g.shape[1], x.shape[1]),
                lambda: (
                    f"weight_acc has shape {_sizes(weight_acc)} but g and x need "
                    f"({g.shape[1]}, {x.shape[1]})"
                ),
            )
        if bias_acc is not None:
            _check(
                bias_acc.shape == (g.shape[1],),
                lambda: f"bias_acc has shape {_sizes(bias_acc)} but g needs ({g.shape[1]},)",
            )
            _check(
                bias_acc.dtype == some.dtype,
                lambda: "weight_acc and bias_acc must share one dtype",
            )
