"""Python entry points to the compiled ops, with their fake (meta) implementations.

The fake implementations give output shapes and dtypes without computing anything, so the ops
can be traced by ``torch.compile`` and checked by ``torch.library.opcheck``.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    counts the zero rows and columns before the input; entries past its end read as zero.
    Returns (groups, O/groups, C/groups * kh * kw) in ``acc_dtype``; no im2col tensor is built.
    """
    return _op("conv2d_sq_sum")(
        x, g, list(kernel_size), list(stride), list(padding), list(dilation), groups, acc_dtype
    )


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


if _library.is_loaded():

    @torch.library.register_fake("fisher_fast::frechet_sums")
    def _frechet_sums_fake(ref: list[torch.Tensor], others: list[torch.Tensor]) -> torch.Tensor:
        torch._check(len(ref) > 0, lambda: "the reference list is empty")
        torch._check(len(others) % len(ref) == 0, lambda: "others must hold K * len(ref) tensors")
        k = len(others) // len(ref)
        return ref[0].new_empty((k, FRECHET_COLUMNS), dtype=torch.float64)

    @torch.library.register_fake("fisher_fast::per_sample_sq_sum")
    def _per_sample_sq_sum_fake(
        g: torch.Tensor, x: torch.Tensor, acc_dtype: torch.dtype
    ) -> torch.Tensor:
        torch._check(g.dim() == 4 and x.dim() == 4, lambda: "g and x must be 4-D")
        return g.new_empty((g.shape[1], g.shape[3], x.shape[3]), dtype=acc_dtype)

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
        torch._check(x.dim() == 4 and g.dim() == 4, lambda: "x and g must be 4-D")
        columns = x.shape[1] // groups * kernel_size[0] * kernel_size[1]
        return x.new_empty((groups, g.shape[1] // groups, columns), dtype=acc_dtype)

    @torch.library.register_fake("fisher_fast::linear_sq_sum_")
    def _linear_sq_sum_fake(
        weight_acc: torch.Tensor | None,
        bias_acc: torch.Tensor | None,
        g: torch.Tensor,
        x: torch.Tensor,
        g_squared: bool = False,
    ) -> None:
        torch._check(g.dim() == 2 and x.dim() == 2, lambda: "g and x must be 2-D")
        torch._check(
            weight_acc is not None or bias_acc is not None, lambda: "nothing to accumulate"
        )
