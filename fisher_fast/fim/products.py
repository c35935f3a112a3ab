"""Sums of squared per-sample products, the one primitive every weight rule reduces to.

``square_sum(g, x)`` returns ``sum_n (g[n, b]^T x[n, b])**2`` for g: (N, B, T, O) output
gradients and x: (N, B, T, I) inputs (B independent blocks, e.g. convolution groups; T positions).

* T == 1 factors exactly: ``(g∘g)^T (x∘x)``, one matrix product, no per-sample tensor at all.
* Otherwise the ``kernels`` backend calls the compiled op (per-thread accumulators on CPU, a
  fused product-square-reduce on CUDA), the ``triton`` backend a Triton kernel on tensor cores
  (triton_products.py), and the ``torch`` backend runs the same math as chunked batched
  products in PyTorch, never holding more than ``chunk_bytes`` of per-sample products (by
  default 32 MiB on the CPU, a share of the free memory on a GPU: work_memory.py).
"""

from __future__ import annotations

import torch

from fisher_fast import ops
from fisher_fast.fim import triton_products
from fisher_fast.fim.work_memory import work_bytes

DEFAULT_CHUNK_BYTES = 32 * 2**20


def compute_dtype(acc_dtype: torch.dtype) -> torch.dtype:
    """Products run in float64 when accumulating in float64, else in float32."""
    return torch.float64 if acc_dtype == torch.float64 else torch.float32


def square_sum(
    g: torch.Tensor,
    x: torch.Tensor,
    acc_dtype: torch.dtype,
    backend: str,
    chunk_bytes: int | None = None,
    triton_precision: str | None = None,
) -> torch.Tensor:
    """(B, O, I) sum over samples of squared per-sample products g[n,b]^T x[n,b]; see module doc
    (``triton_precision``: the triton backend's, triton_products.dot_precision)."""
    work = compute_dtype(acc_dtype)
    n, blocks, positions, out_f = g.shape
    in_f = x.shape[-1]
    if positions == 1:
        g2 = g[:, :, 0].to(work).square().transpose(0, 1)  # (B, N, O)
        x2 = x[:, :, 0].to(work).square().transpose(0, 1)  # (B, N, I)
        return torch.bmm(g2.transpose(1, 2), x2).to(acc_dtype)
    if backend == "kernels":
        return ops.per_sample_sq_sum(g, x, acc_dtype)
    if backend == "triton":
        return triton_products.square_sum(g, x, acc_dtype, triton_precision)
    out = torch.zeros(blocks, out_f, in_f, dtype=acc_dtype, device=g.device)
    budget = work_bytes(g.device, DEFAULT_CHUNK_BYTES) if chunk_bytes is None else chunk_bytes
    step = max(1, budget // max(1, blocks * out_f * in_f * torch.finfo(work).bits // 8))
    for start in range(0, n, step):
        gs = g[start : start + step].to(work).transpose(2, 3)
        xs = x[start : start + step].to(work)
        out += torch.matmul(gs, xs).square_().sum(0, dtype=acc_dtype)
    return out
