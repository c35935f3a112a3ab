"""Correctness and speed check of fisher_fast's CUDA kernels, for a machine with a GPU.

Build the package with its CUDA kernels first, then run this script::

    FISHER_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation --no-deps -e .
    python benchmarks/gpu_check.py --budget-s 300 --results gpu_results.txt
    python benchmarks/gpu_check.py --dry-run  # imports and arguments only; runs without a GPU
    python benchmarks/gpu_check.py --smoke    # the GPT-2 layer, end-to-end, cuBLAS-ratio and
                                              # Algorithm 1 sections, small, on the CPU

The check runs in sections, each given a share of ``--budget-s`` from what is left (its cap,
less what the sections after it need at least); a section that cannot have its minimum is
skipped and says so. Each section's checks and timings are appended to ``--results`` as it
finishes, so a run stopped from outside keeps what it measured.

Checks (every CUDA op against the CPU op and a float64 PyTorch reference, on fresh random inputs):

* ``frechet_sums``: K = 1, 3 and 10 (more than one pass of 8 others), lists of several tensors
  including misaligned and empty ones, float32/float64/float16/bfloat16, near-identical inputs
  (distance about 1e-6, where the three-sum formula cancels), all-zero inputs, and invalid
  entries (negative, NaN, inf) that must be counted exactly.
* ``per_sample_sq_sum``: linear-like (T = 1 and T = 128), conv-like (T = 1024), depthwise
  (B = 64, O = 1), odd sizes that fill no tile, non-contiguous inputs; float32/float64/bfloat16/
  float16 inputs with float32 and float64 accumulation.
* every output finite where the reference is, results bitwise reproducible; bad input refused
  with a RuntimeError (each case in a child process, so that a crash is reported, not fatal).
* optional: ``fisher_fast.diag_fim(backend="kernels")`` on a small CNN, CUDA against CPU (skipped
  while ``diag_fim`` does not exist); a tied embedding and head with repeated ids, CUDA against
  CPU and bitwise reproducible (no float atomics).
* the Triton kernel (``backend="triton"``, fisher_fast/fim/triton_products.py) against the
  float64 reference, exact float32 (``ieee``, 1e-5), TF32 (1e-3) and BF16 (2^-6), and bitwise
  reproducible; ``diag_fim(backend="triton")`` against the CPU on a small sequence model.
* the Triton convolution kernels (implicit GEMM and depthwise, fisher_fast/fim/triton_conv.py)
  at ResNet-18 and EfficientNet-B0 layer shapes against float64 per-sample weight gradients, in
  both precisions, bitwise reproducible.
* GPT-2 small's layers at T = 512 (768 -> 2304, 768 <-> 3072, attention with 12 heads, the tied
  head 768 x 50257 on 2 samples), each alone through diag_fim's Linear, transposed-Linear
  (Conv1D), MultiheadAttention and tied-head rules, on both backends and every Triton precision,
  against a float64 per-sample loop on the CPU: max and median relative error, rule paths.
* Algorithm 1 through the command line on the GPU (``dictionary build`` of the embedded digits
  without task 2, then ``search --target 2``; smallest settings, ``--device cuda``), each step a
  child process within the section's time.

Errors are max |out - ref| / max |ref| (relative to the largest reference entry). Float32
arithmetic must stay under 1e-5; float64 under 1e-12. Half and bfloat16 inputs are compared with
a reference built from the same rounded values, so they meet the float32 bound too.

Timings: median of many runs timed with CUDA events after a warm-up, against the same math in
plain PyTorch on the GPU (TF32 off, so both sides do float32 arithmetic); the Triton kernel in
every precision on the same shapes; per layer, our products (GPT-2's linear layers at T = 512,
N = 8: the CUDA op and the Triton kernel; ResNet-18 and EfficientNet-B0 convolutions: the Triton
kernels) against the vendor's weight gradient of the same batch in the same precision (cuBLAS's
g^T x by torch.mm, cuDNN's by torch.nn.grad.conv2d_weight; TF32 against TF32, float32 against
ieee and 3xTF32), the vendor's cost of that layer in one backward pass; and end to end,
``diag_fim`` (kernels and triton backends, and the triton backend with TF32 products under a
TF32 model), torch.func vmap(grad), BackPACK and Opacus against a plain forward and backward pass
(the floor; under TF32 for the TF32 row), each as the median time of a warm batch (every batch
stamped with a CUDA event as it is asked for; the first call and each call's first batch, where
diag_fim plans, left out) with peak memory, on the GPU issue's models in plain torch.nn
(benchmarks/gpu_models.py: a CIFAR ResNet-18 at N = 256, ResNet-18 and ResNet-50 at 224 px,
ViT-B/16, a GPT-2-small-like decoder with its tied head at T = 512); the triton backend's FIM
there is checked against the kernels backend's.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import faulthandler
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import gpu_models  # beside this script
import numpy as np
import torch
from per_sample_losses import lm_loss  # beside this script

import fisher_fast
from fisher_fast import ops

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
TOL_F32 = 1e-5  # float32 products and sums (also half / bfloat16 inputs)
TOL_F64 = 1e-12  # float64 everywhere (and frechet_sums, which always sums in float64)
TOL_NEAR = 5e-3  # relative error of d ~ 1e-6 from the cancelling three-sum formula
TOL_FIM = 1e-4  # diag_fim on CUDA against CPU (different convolution algorithms)
WARMUP, REPEATS = 3, 25

FRECHET_TIMING_N = 100_000_000  # float32 elements per FIM
# Per-sample timing shapes: name -> (N, B, T, O, I).
PER_SAMPLE_TIMING = {
    "MLP linear": (512, 1, 1, 512, 784),
    "conv layer": (256, 1, 256, 64, 288),
    "transformer linear": (64, 1, 128, 2048, 256),
    "depthwise conv": (256, 64, 1024, 1, 9),
}
# Convolution layers: name -> (N, C, O, H, W, kernel, stride, padding, groups); ResNet-18 at
# 224 px and EfficientNet-B0's depthwise layers.
CONV_LAYERS = {
    "resnet18 stem 7x7/2": (32, 3, 64, 224, 224, 7, 2, 3, 1),
    "resnet18 3x3 64 @56": (32, 64, 64, 56, 56, 3, 1, 1, 1),
    "resnet18 3x3/2 128 @56": (32, 64, 128, 56, 56, 3, 2, 1, 1),
    "resnet18 3x3 256 @14": (32, 256, 256, 14, 14, 3, 1, 1, 1),
    "resnet18 1x1/2 512 @14": (32, 256, 512, 14, 14, 1, 2, 0, 1),
    "effnet dw 3x3 96 @112": (32, 96, 96, 112, 112, 3, 2, 1, 96),
    "effnet dw 5x5 480 @14": (32, 480, 480, 14, 14, 5, 1, 2, 480),
}
BASELINE_CHUNK_BYTES = 2 << 30  # per-sample products the PyTorch baseline may hold at once

GPT2_T = 512  # positions per sample in GPT-2's layer checks and timings
# GPT-2 small's layers, each alone (gpu_models.gpt2_layer): name -> (path, width, size, samples);
# size is the output features (linear, conv1d), the heads (attention) or the vocabulary (tied).
GPT2_LAYERS = {
    "linear 768->2304 (qkv)": ("linear", 768, 2304, 4),
    "linear 768->3072 (mlp fc)": ("linear", 768, 3072, 4),
    "linear 3072->768 (mlp proj)": ("linear", 3072, 768, 4),
    "conv1d 768->2304 (qkv)": ("conv1d", 768, 2304, 4),
    "conv1d 768->3072 (mlp fc)": ("conv1d", 768, 3072, 4),
    "conv1d 3072->768 (mlp proj)": ("conv1d", 3072, 768, 4),
    "attention 768, 12 heads": ("attention", 768, 12, 4),
    "tied head 768x50257": ("tied", 768, 50257, 2),
}
# GPT-2's linear products at its batch (N = 8, T = 512): name -> (N, input, output features).
LINEAR_LAYERS = {
    "gpt2 qkv 768->2304": (8, 768, 2304),
    "gpt2 attn out 768->768": (8, 768, 768),
    "gpt2 mlp fc 768->3072": (8, 768, 3072),
    "gpt2 mlp proj 3072->768": (8, 3072, 768),
    "gpt2 head 768->50257": (8, 768, 50257),
}
TOL_E2E_TF32 = 1e-2  # a model's FIM under TF32 (model and products) against float32 kernels
E2E_BATCHES, E2E_CALLS = 4, 3  # batches per timed call; calls per method, the first a warm-up
SMOKE_SCALE = 16  # --smoke divides the widths and positions of the GPT-2 shapes by this
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
@dataclass
class Check:
    section: str
    name: str
    value: float  # error (or 0/1 for yes-no checks)
    limit: float
    status: str  # PASS, FAIL or SKIP
    note: str = ""


@dataclass
class Timing:
    kernel: str
    shape: str
    ours_ms: float
    torch_ms: float
    torch_what: str
    rate: str  # effective bandwidth or arithmetic rate of our kernel


CHECKS: list[Check] = []
TIMINGS: list[Timing] = []


def format_check(c: Check) -> str:
    """One line of a check: status, section, name, value against its limit, note."""
    return f"{c.status}: [{c.section}] {c.name}: {c.value:.3e} (limit {c.limit:.0e}) {c.note}"


def format_timing(r: Timing) -> str:
    """One summary row of a timing: ours, the baseline, their ratio (baseline / ours)."""
    speedup = r.torch_ms / r.ours_ms if r.ours_ms > 0 else math.nan
    return (
        f"{r.kernel:<26} {r.shape:<52} {r.ours_ms:9.3f} {r.torch_ms:9.3f} {speedup:6.2f}  "
        f"{r.rate:>16}  {r.torch_what}"
    )


TIMING_HEAD = (
    f"{'kernel':<26} {'shape':<52} {'ours ms':>9} {'base ms':>9} {'x':>6}  {'our rate':>16}  "
    "baseline (x = baseline / ours)"
)


def record(section: str, name: str, value: float, limit: float, note: str = "") -> None:
    """Record an error against its limit (NaN fails) and print it at once."""
    ok = math.isfinite(value) and value <= limit
    CHECKS.append(Check(section, name, value, limit, "PASS" if ok else "FAIL", note))
    print(f"  {'PASS' if ok else 'FAIL'}  {name:<58} {value:10.3e}  (limit {limit:.0e}) {note}")


def record_bool(section: str, name: str, ok: bool, note: str = "") -> None:
    record(section, name, 0.0 if ok else 1.0, 0.0, note)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| over finite entries; inf when non-finite entries disagree."""
    out, ref = out.double(), ref.double().to(out.device)
    if out.shape != ref.shape:
        return math.inf
    finite = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(out), finite) or not torch.equal(
        torch.isnan(out), torch.isnan(ref)
    ):
        return math.inf
    if not finite.any():
        return 0.0
    diff = (out[finite] - ref[finite]).abs().max().item()
    scale = ref[finite].abs().max().item()
    return diff / scale if scale > 0 else diff


def median_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Median over the entries where ref is nonzero and finite of |out - ref| / |ref|: the
    typical entry's error, where :func:`rel_err` gives the worst against the largest."""
    out, ref = out.double().flatten(), ref.double().to(out.device).flatten()
    keep = torch.isfinite(ref) & (ref != 0)
    if not keep.any():
        return 0.0
    return ((out[keep] - ref[keep]).abs() / ref[keep].abs()).median().item()


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same bits (NaN included), for reproducibility checks."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = {torch.float64: torch.int64, torch.float32: torch.int32}[a.dtype]
    return torch.equal(a.view(as_int), b.view(as_int))


# ---------------------------------------------------------------------------------------------
# frechet_sums
# ---------------------------------------------------------------------------------------------
def frechet_reference(ref: Sequence[torch.Tensor], others: Sequence[torch.Tensor]) -> torch.Tensor:
    """(K, 5) float64 sums of csrc/fisher_fast.cpp's frechet_sums, in plain float64 PyTorch."""
    p = len(ref)
    a = torch.cat([t.double().reshape(-1) for t in ref])
    rows = []
    for k in range(len(others) // p):
        b = torch.cat([t.double().reshape(-1) for t in others[k * p : (k + 1) * p]])
        rows.append(
            torch.stack(
                [
                    a.sum(),
                    b.sum(),
                    (a * b).sqrt().sum(),
                    (~(torch.isfinite(a) & (a >= 0))).sum().double(),
                    (~(torch.isfinite(b) & (b >= 0))).sum().double(),
                ]
            )
        )
    return torch.stack(rows) if rows else torch.zeros(0, 5, dtype=torch.float64)


def distance_from_sums(sums: torch.Tensor) -> float:
    """Fréchet distance of the first pair from its three sums (fisher_fast.distance's formula)."""
    sa, sb, cross = (float(v) for v in sums[0, :3])
    return math.sqrt(max(0.0, 1.0 - cross / math.sqrt(sa * sb)))


def random_fim(sizes: Sequence[int], dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    """Positive random diagonals of the given sizes, spread over a few decades like real FIMs."""
    return [
        torch.rand(n, device=device, dtype=torch.float64).pow(4).add(1e-8).to(dtype) for n in sizes
    ]


def check_frechet_case(name: str, ref: list[torch.Tensor], others: list[torch.Tensor]) -> None:
    """CUDA op against the CPU op (float64 sums: TOL_F64) and the float64 reference."""
    out = ops.frechet_sums(ref, others)
    cpu = ops.frechet_sums([t.cpu() for t in ref], [t.cpu() for t in others])
    expected = frechet_reference(ref, others)
    ok_shape = out.shape == expected.shape and out.dtype == torch.float64
    ok_shape = ok_shape and out.device == ref[0].device
    record_bool("frechet", f"{name}: shape, dtype, device", ok_shape, str(tuple(out.shape)))
    # Half inputs: the float64 reference sums the same values, so float64 bounds still apply.
    record("frechet", f"{name}: vs CPU op", rel_err(out, cpu), TOL_F64)
    record("frechet", f"{name}: vs float64 reference", rel_err(out, expected), TOL_F64)
    again = ops.frechet_sums(ref, others)
    record_bool("frechet", f"{name}: bitwise reproducible", bitwise_equal(out, again))


def check_frechet(device: str) -> None:
    print("\n[frechet_sums] CUDA against CPU op and float64 reference")
    g = torch.Generator(device="cpu").manual_seed(0)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))

    ref = random_fim([1_000_003], torch.float32, device)
    check_frechet_case(
        "K=1, 1 tensor, fp32, odd size", ref, random_fim([1_000_003], torch.float32, device)
    )

    # Several tensors, one misaligned (a view at offset 1: scalar path), one empty, one tiny.
    sizes = [4096, 1, 0, 300_001, 77]
    base = random_fim([sizes[3] + 1], torch.float32, device)[0]
    ref = random_fim(sizes, torch.float32, device)
    ref[3] = base[1:]
    others = [t for _ in range(3) for t in random_fim(sizes, torch.float32, device)]
    check_frechet_case("K=3, 5 tensors (misaligned, empty), fp32", ref, others)

    sizes = [70_001, 12_345]
    ref = random_fim(sizes, torch.float64, device)
    others = [t for _ in range(10) for t in random_fim(sizes, torch.float64, device)]
    check_frechet_case("K=10 (2 passes), 2 tensors, fp64", ref, others)

    for dtype in (torch.float16, torch.bfloat16):
        sizes = [65_537, 3]
        ref = random_fim(sizes, dtype, device)
        others = [t for _ in range(2) for t in random_fim(sizes, dtype, device)]
        check_frechet_case(f"K=2, 2 tensors, {str(dtype)[6:]}", ref, others)

    # Zeros: sums exactly zero, nothing invalid.
    zeros = [torch.zeros(10_000, device=device)]
    check_frechet_case("all zeros", zeros, [torch.zeros(10_000, device=device)])

    # Invalid entries: counted exactly, NaN propagates into the sums like on the CPU.
    ref = random_fim([50_000], torch.float32, device)
    other = random_fim([50_000], torch.float32, device)
    ref[0][[5, 999, 40_000]] = torch.tensor([-1.0, float("nan"), float("inf")], device=device)
    other[0][[7, 8, 9, 49_999]] = torch.tensor(
        [-float("inf"), -0.5, float("nan"), float("inf")], device=device
    )
    check_frechet_case("invalid entries (-1, NaN, +-inf)", ref, other)
    out = ops.frechet_sums(ref, other)
    record_bool(
        "frechet",
        "invalid entries: counts 3 and 4",
        out[0, 3].item() == 3 and out[0, 4].item() == 4,
        f"got {out[0, 3].item():.0f}, {out[0, 4].item():.0f}",
    )

    # Near-identical: d ~ 1e-6, where 1 - cross / sqrt(sa * sb) cancels to about 1e-12.
    n = 1_000_000
    a = torch.rand(n, device=device, dtype=torch.float64).add(0.1)
    b = a * (1 + 2.83e-6 * torch.randn(n, device=device, dtype=torch.float64))
    a32, b32 = a.float(), b.float()
    a64, b64 = a32.double(), b32.double()
    direct = (0.5**0.5) * ((a64 / a64.sum()).sqrt() - (b64 / b64.sum()).sqrt()).norm().item()
    d_cuda = distance_from_sums(ops.frechet_sums([a32], [b32]))
    d_cpu = distance_from_sums(ops.frechet_sums([a32.cpu()], [b32.cpu()]))
    note = f"d={direct:.3e}, cuda {d_cuda:.3e}, cpu {d_cpu:.3e}"
    record(
        "frechet",
        "near-identical (d~1e-6): CUDA d vs direct",
        abs(d_cuda - direct) / direct,
        TOL_NEAR,
        note,
    )
    record(
        "frechet",
        "near-identical (d~1e-6): CPU d vs direct",
        abs(d_cpu - direct) / direct,
        TOL_NEAR,
    )


# ---------------------------------------------------------------------------------------------
# per_sample_sq_sum
# ---------------------------------------------------------------------------------------------
def per_sample_reference(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, O, I) float64: sum_n (g[n,b]^T x[n,b])^2 with every per-sample product materialised."""
    prod = torch.einsum("nbto,nbti->nboi", g.double(), x.double())
    return prod.square().sum(0)


# Correctness shapes: name -> (N, B, T, O, I).
PER_SAMPLE_CASES = {
    "linear B=1 T=1": (96, 1, 1, 100, 70),
    "linear T=128": (8, 1, 128, 96, 80),
    "conv-like T=1024, 2 groups": (4, 2, 1024, 64, 75),
    "depthwise B=64 O=1": (8, 64, 256, 1, 9),
    "odd sizes (no full tile)": (3, 3, 17, 65, 129),
    "single sample, O=I=1": (1, 1, 5, 1, 1),
}
PER_SAMPLE_DTYPES = [
    (torch.float32, torch.float32, TOL_F32),
    (torch.float32, torch.float64, TOL_F32),
    (torch.float64, torch.float64, TOL_F64),
    (torch.bfloat16, torch.float32, TOL_F32),
    (torch.float16, torch.float32, TOL_F32),
]


def check_per_sample(device: str) -> None:
    print("\n[per_sample_sq_sum] CUDA against CPU op and float64 reference")
    torch.manual_seed(1)
    for case, (n, b, t, o, i) in PER_SAMPLE_CASES.items():
        for dtype, acc, tol in PER_SAMPLE_DTYPES:
            g = torch.randn(n, b, t, o, device=device).to(dtype)
            x = torch.randn(n, b, t, i, device=device).to(dtype)
            out = ops.per_sample_sq_sum(g, x, acc)
            label = f"{case}, {str(dtype)[6:]}->{str(acc)[6:]}"
            good = out.shape == (b, o, i) and out.dtype == acc and out.device == g.device
            good = good and bool(torch.isfinite(out).all())
            if not good:
                record_bool("per_sample", f"{label}: shape/dtype/finite", False, str(out.shape))
                continue
            err_ref = rel_err(out, per_sample_reference(g, x))
            err_cpu = rel_err(out, ops.per_sample_sq_sum(g.cpu(), x.cpu(), acc))
            record(
                "per_sample", f"{label}: vs float64 ref", err_ref, tol, f"(vs CPU op {err_cpu:.1e})"
            )
            if err_cpu > tol:
                record("per_sample", f"{label}: vs CPU op", err_cpu, tol)

    g = torch.randn(16, 2, 40, 48, device=device)
    x = torch.randn(16, 2, 40, 33, device=device)
    out = ops.per_sample_sq_sum(g, x, torch.float32)
    record_bool(
        "per_sample",
        "bitwise reproducible",
        bitwise_equal(out, ops.per_sample_sq_sum(g, x, torch.float32)),
    )
    x_nc = torch.randn(16, 2, 33, 40, device=device).transpose(2, 3)  # non-contiguous view
    record(
        "per_sample",
        "non-contiguous x",
        rel_err(ops.per_sample_sq_sum(g, x_nc, torch.float32), per_sample_reference(g, x_nc)),
        TOL_F32,
    )
    empty = ops.per_sample_sq_sum(g[:0], x[:0], torch.float32)
    record_bool(
        "per_sample", "N=0 gives zeros", empty.shape == (2, 48, 33) and not empty.any().item()
    )


def check_opcheck(device: str) -> None:
    """torch.library.opcheck on CUDA inputs: schema, fake kernels and autograd registration."""
    print("\n[opcheck] CUDA")
    samples = {
        "frechet_sums": (
            torch.ops.fisher_fast.frechet_sums.default,
            ([torch.rand(100, device=device)], [torch.rand(100, device=device)]),
        ),
        "per_sample_sq_sum": (
            torch.ops.fisher_fast.per_sample_sq_sum.default,
            (
                torch.randn(3, 1, 4, 5, device=device),
                torch.randn(3, 1, 4, 6, device=device),
                torch.float32,
            ),
        ),
    }
    for name, (op, args) in samples.items():
        try:
            torch.library.opcheck(op, args)
            record_bool("opcheck", name, True)
        except Exception as exc:  # report, do not stop the other checks
            record_bool("opcheck", name, False, f"{type(exc).__name__}: {str(exc)[:120]}")


# ---------------------------------------------------------------------------------------------
# Bad input: each case runs in a child process, so that a crash is a FAIL and not the end
# ---------------------------------------------------------------------------------------------
def _bad_inputs(device: str) -> dict[str, Callable[[], object]]:
    g = torch.randn(4, 2, 10, 6, device=device)
    x = torch.randn(4, 2, 10, 5, device=device)
    a, b = torch.rand(100, device=device), torch.rand(100, device=device)
    return {
        "per_sample: x on CPU": lambda: ops.per_sample_sq_sum(g, x.cpu(), torch.float32),
        "per_sample: acc_dtype float16": lambda: ops.per_sample_sq_sum(g, x, torch.float16),
        "per_sample: dtypes differ": lambda: ops.per_sample_sq_sum(g, x.double(), torch.float32),
        "per_sample: T differs": lambda: ops.per_sample_sq_sum(g, x[:, :, :5], torch.float32),
        "per_sample: 3-D input": lambda: ops.per_sample_sq_sum(g[0], x[0], torch.float32),
        "frechet: other on CPU": lambda: ops.frechet_sums([a], [b.cpu()]),
        "frechet: dtypes differ": lambda: ops.frechet_sums([a], [b.double()]),
        "frechet: sizes differ": lambda: ops.frechet_sums([a], [b[:50]]),
        "frechet: non-contiguous": lambda: ops.frechet_sums(
            [a], [torch.rand(200, device=device)[::2]]
        ),
    }


def run_bad_input(name: str, device: str) -> int:
    """Child process: 0 when the op refuses the input with a RuntimeError, 1 when it accepts it."""
    try:
        _bad_inputs(device)[name]()
    except RuntimeError as exc:
        print(str(exc).splitlines()[0][:200])
        return 0
    return 1


def check_bad_inputs(device: str) -> None:
    print("\n[bad input] every op refuses it with a RuntimeError (one child process per case)")
    for name in _bad_inputs(device):
        # -X faulthandler: a crash in the child prints its Python trace (also during imports).
        cmd = [sys.executable, "-X", "faulthandler", __file__, "--bad-input", name]
        cmd += ["--device", device]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        for stream, text in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            if text.strip():
                print(f"  [{name}: child {stream}]\n    " + text.strip().replace("\n", "\n    "))
        last = (proc.stdout.strip().splitlines() or [""])[-1][:100]
        if proc.returncode < 0:
            note = f"crashed with signal {-proc.returncode} instead of raising"
        elif proc.returncode == 1:
            note = "accepted"
        else:
            note = last if proc.returncode == 0 else proc.stderr.strip()[-100:]
        record_bool("bad input", name, proc.returncode == 0, note)


# ---------------------------------------------------------------------------------------------
# Optional: diag_fim with the kernels backend, CUDA against CPU
# ---------------------------------------------------------------------------------------------
def check_diag_fim(device: str) -> None:
    print("\n[diag_fim] optional: small CNN, backend='kernels', CUDA against CPU")
    if not hasattr(fisher_fast, "diag_fim"):
        CHECKS.append(
            Check("diag_fim", "small CNN, CUDA vs CPU", 0.0, TOL_FIM, "SKIP", "no diag_fim")
        )
        print("  SKIP  fisher_fast.diag_fim does not exist yet")
        return
    from torch import nn

    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, 10),
    )
    x, y = torch.randn(48, 3, 16, 16), torch.randint(0, 10, (48,))
    try:
        cpu = fisher_fast.diag_fim(model, (x, y), backend="kernels", progress=False, batch_size=16)
        model_gpu = model.to(device)
        gpu = fisher_fast.diag_fim(
            model_gpu,
            (x.to(device), y.to(device)),
            backend="kernels",
            progress=False,
            batch_size=16,
        )
        record("diag_fim", "small CNN, CUDA vs CPU", rel_err(gpu.flat, cpu.flat), TOL_FIM)
    except Exception as exc:  # an API or runtime failure is a failed check, with its reason
        record_bool(
            "diag_fim", "small CNN, CUDA vs CPU", False, f"{type(exc).__name__}: {str(exc)[:160]}"
        )
    check_tied_embedding(device)


class TiedTokens(torch.nn.Module):
    """Token ids (N, T) -> logits over the vocabulary, the head tied to the embedding."""

    def __init__(self, vocab: int = 1000, dim: int = 64) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.mix = torch.nn.Linear(dim, dim)
        self.out = torch.nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.embed(ids))).mean(1))


def check_tied_embedding(device: str) -> None:
    """The Embedding and tied-head rules sum repeated ids without float atomics on CUDA
    (fisher_fast/fim/rows.py): two runs bitwise equal, and equal to the CPU within TOL_FIM."""
    torch.manual_seed(4)
    model = TiedTokens().eval()
    ids, y = torch.randint(0, 50, (64, 128)), torch.randint(0, 1000, (64,))  # many repeats
    label = "tied embedding, CUDA vs CPU"
    try:
        cpu = fisher_fast.diag_fim(model, (ids, y), progress=False, batch_size=32)
        data = (ids.to(device), y.to(device))
        gpu = fisher_fast.diag_fim(model.to(device), data, progress=False, batch_size=32)
        again = fisher_fast.diag_fim(model, data, progress=False, batch_size=32)
        record("diag_fim", label, rel_err(gpu.flat, cpu.flat), TOL_FIM)
        record_bool(
            "diag_fim", "tied embedding bitwise reproducible", bitwise_equal(gpu.flat, again.flat)
        )
    except Exception as exc:
        record_bool("diag_fim", label, False, f"{type(exc).__name__}: {str(exc)[:160]}")


# ---------------------------------------------------------------------------------------------
# The Triton kernel
# ---------------------------------------------------------------------------------------------
TOL_TF32 = 1e-3  # TF32 inputs (10-bit mantissa), float32 accumulation
# bfloat16 inputs (8-bit significand, rounded to nearest: each off by up to u = 2^-8), float32
# accumulation: a squared product of two rounded inputs is off by up to (1 + u)^4 - 1, about
# 4u = 2^-6, which bounds every entry whose per-sample sums do not cancel (the tests check the
# entrywise bound with cancellation, tests/triton_helpers.square_sum_bound); random inputs at
# these shapes give about 2e-3 (float64 emulation of the rounding).
TOL_BF16 = 2.0**-6
# Each precision of the Triton products and the error allowed against float64: 3xTF32 splits
# every input into TF32 high and low parts, so it should reach float32's level.
TRITON_PRECISIONS = {"ieee": TOL_F32, "tf32x3": TOL_F32, "tf32": TOL_TF32, "bf16": TOL_BF16}


def _triton_square_sum(g: torch.Tensor, x: torch.Tensor, precision: str) -> torch.Tensor:
    from fisher_fast.fim import triton_products

    return triton_products.square_sum(g, x, torch.float32, precision)


def check_triton(device: str) -> None:
    print("\n[triton] square_sum against the float64 reference; diag_fim against the CPU")
    try:
        from fisher_fast.fim import triton_products
    except ImportError as exc:
        record_bool("triton", "import", False, str(exc))
        return
    if not triton_products.available():
        record_bool("triton", "Triton imports", False, "no triton in this torch build")
        return
    torch.manual_seed(5)
    shapes = {"ragged": (7, 2, 37, 70, 45), "linear T=128": (16, 1, 128, 256, 192),
              "conv-like": (8, 1, 1024, 64, 288), "depthwise": (8, 64, 1024, 1, 9)}  # fmt: skip
    for name, (n, b, t, o, i) in shapes.items():
        g = torch.randn(n, b, t, o, device=device)
        x = torch.randn(n, b, t, i, device=device)
        reference = per_sample_reference(g, x)
        for precision, tol in TRITON_PRECISIONS.items():
            out = _triton_square_sum(g, x, precision)
            record("triton", f"{name} {precision}", rel_err(out, reference), tol)
        record_bool("triton", f"{name} bitwise reproducible",
                    bitwise_equal(out, _triton_square_sum(g, x, precision)))  # fmt: skip
    from torch import nn

    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(12, 64), nn.GELU(), nn.Linear(64, 10))
    x3, y = torch.randn(32, 20, 12), torch.randint(0, 10, (32,))

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(out.mean(1), target, reduction="none")

    try:
        cpu = fisher_fast.diag_fim(model, (x3, y), loss=loss, progress=False, batch_size=16)
        gpu = fisher_fast.diag_fim(
            model.to(device), (x3.to(device), y.to(device)), loss=loss, backend="triton",
            progress=False, batch_size=16,
        )  # fmt: skip
        record("triton", "diag_fim sequence model vs CPU", rel_err(gpu.flat, cpu.flat), TOL_FIM)
    except Exception as exc:
        record_bool(
            "triton", "diag_fim sequence model vs CPU", False, f"{type(exc).__name__}: {exc}"
        )


def _conv_inputs(
    layer: tuple[int, ...], device: str, samples: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """A layer's input x, an output gradient g of the right size, and its weight shape."""
    n, c, o, h, w, k, stride, pad, groups = layer
    n = samples or n
    weight_shape = (o, c // groups, k, k)
    x = torch.randn(n, c, h, w, device=device)
    out = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    return x, torch.randn(n, o, *out, device=device), weight_shape


def _triton_conv(
    x: torch.Tensor, g: torch.Tensor, layer: tuple[int, ...], precision: str
) -> torch.Tensor:
    from fisher_fast.fim import triton_conv

    *_, k, stride, pad, groups = layer
    return triton_conv.conv2d_square_sum(
        x, g, (k, k), (stride, stride), (pad, pad), (1, 1), groups, torch.float32, precision
    )


def check_triton_conv(device: str) -> None:
    print("\n[triton-conv] conv2d_square_sum against float64 per-sample weight gradients")
    torch.manual_seed(8)
    for name, layer in CONV_LAYERS.items():
        *_, stride, pad, groups = layer
        x, g, weight_shape = _conv_inputs(layer, device, samples=4)
        reference = torch.zeros(weight_shape, dtype=torch.float64, device=device)
        for n in range(x.shape[0]):
            grad = torch.nn.grad.conv2d_weight(
                x[n : n + 1].double(), weight_shape, g[n : n + 1].double(), stride, pad, 1, groups
            )
            reference += grad.square()
        reference = reference.reshape(groups, weight_shape[0] // groups, -1)
        try:
            for precision, tol in TRITON_PRECISIONS.items():
                out = _triton_conv(x, g, layer, precision)
                record("triton-conv", f"{name} {precision}", rel_err(out, reference), tol)
            record_bool("triton-conv", f"{name} bitwise reproducible",
                        bitwise_equal(out, _triton_conv(x, g, layer, precision)))  # fmt: skip
        except Exception as exc:
            record_bool("triton-conv", name, False, f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------
# GPT-2's layers through diag_fim's rules, against a float64 per-sample loop on the CPU
# ---------------------------------------------------------------------------------------------
def gpt2_layers(scale: int) -> dict[str, tuple[str, int, int, int]]:
    """:data:`GPT2_LAYERS` with widths, output features and vocabularies divided by ``scale``
    (the attention heads kept)."""
    return {
        name: (path, width // scale, size if path == "attention" else size // scale, n)
        for name, (path, width, size, n) in GPT2_LAYERS.items()
    }


def float64_fim(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The empirical diagonal Fisher (1/N) sum_n (dL_n/dθ)^2 of a float64 copy of ``model`` on
    the CPU, one sample at a time, per trainable parameter (``named_parameters`` order)."""
    ref = copy.deepcopy(model).cpu().double().eval()
    named = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    total = {n: torch.zeros_like(p) for n, p in named}
    for i in range(len(x)):
        xi = x[i : i + 1].cpu()
        xi = xi.double() if xi.is_floating_point() else xi
        grads = torch.autograd.grad(loss(ref(xi), y[i : i + 1].cpu()).sum(), [p for _, p in named])
        for (n, _), g in zip(named, grads, strict=True):
            total[n] += g.square()
    return {n: t / len(x) for n, t in total.items()}


def fim_errors(fim: Any, reference: dict[str, torch.Tensor]) -> tuple[float, float, str]:
    """The worst parameter's :func:`rel_err` (each against its own largest entry), the
    :func:`median_rel_err` over every entry, and the worst parameter's name."""
    worst, worst_name = -1.0, ""
    outs, refs = [], []
    for name, ref in reference.items():
        out = fim[name].double().cpu()
        err = rel_err(out, ref)
        if err > worst:
            worst, worst_name = err, name
        outs.append(out.flatten())
        refs.append(ref.flatten())
    return worst, median_rel_err(torch.cat(outs), torch.cat(refs)), worst_name


def triton_expected(device: str | torch.device) -> bool:
    """Whether the Triton paths are checked on ``device``: always on a GPU (where a missing
    Triton is a failure), elsewhere where Triton runs (its interpreter, TRITON_INTERPRET=1)."""
    from fisher_fast.fim import triton_products

    where = torch.device(device)
    return where.type == "cuda" or triton_products.runs_on(where)


def fim_backends(device: str) -> dict[str, dict[str, Any]]:
    """diag_fim's options for each backend on ``device`` (label -> keyword arguments): the
    compiled kernels where the library is loaded, and the Triton kernels in every precision
    where :func:`triton_expected`."""
    found: dict[str, dict[str, Any]] = {}
    if fisher_fast.is_loaded():
        found["kernels"] = {"backend": "kernels"}
    if triton_expected(device):
        for precision in TRITON_PRECISIONS:
            found[f"triton {precision}"] = {"backend": "triton", "triton_precision": precision}
    return found


def check_gpt2_layers(device: str, deadline: float, scale: int = 1) -> None:
    """Each GPT-2 layer alone (:data:`GPT2_LAYERS`), diag_fim on ``device`` on every backend
    against the float64 loop on the CPU: the worst parameter's max relative error (checked),
    the median relative error (in the note), and the rule each parameter took."""
    layers = gpt2_layers(scale)
    positions = GPT2_T // scale
    backends = fim_backends(device)
    smaller = f", widths / {scale}" if scale > 1 else ""
    print(f"\n[gpt2 layers] T={positions}{smaller}: {', '.join(backends)} against float64 (CPU)")
    gen = torch.Generator().manual_seed(11)
    for name, (path, width, size, n) in layers.items():
        if spent(deadline, name):
            continue
        torch.manual_seed(11)
        model = gpu_models.gpt2_layer(path, width, size).eval()
        x, y = gpu_models.gpt2_layer_batch(path, width, size, n, positions, gen)
        reference = float64_fim(model, x, y, lm_loss)
        model = model.to(device)
        data = (x.to(device), y.to(device))
        paths: set[str] = set()
        for label, options in backends.items():
            tol = TRITON_PRECISIONS.get(options.get("triton_precision", ""), TOL_F32)
            case = f"{name} {label}"
            try:
                fim = fisher_fast.diag_fim(
                    model, data, loss=lm_loss, progress=False, batch_size=n, **options
                )
            except Exception as exc:  # a failing backend is a failed check; the others go on
                record_bool("gpt2 layers", case, False, f"{type(exc).__name__}: {str(exc)[:160]}")
                continue
            worst, median, where = fim_errors(fim, reference)
            record("gpt2 layers", case, worst, max(tol, TOL_FIM), f"median {median:.1e}; {where}")
            paths.update(fim.meta["paths"].values())
        slow = sorted(p for p in paths if not p.startswith("rule"))
        record_bool("gpt2 layers", f"{name}: every parameter by a rule", not slow, "; ".join(slow))
        del model, data, reference
        _free(device)


def spent(deadline: float, what: str) -> bool:
    """Whether ``deadline`` (a :func:`time.perf_counter` reading) has passed; if so, says that
    ``what`` is skipped."""
    if time.perf_counter() <= deadline:
        return False
    print(f"  {what}: skipped (the section's time is spent)")
    return True


def _free(device: str) -> None:
    """Give cached device memory back between large cases (nothing to do on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Algorithm 1 on the device, through the command line
# ---------------------------------------------------------------------------------------------
ALGORITHM1_SETTINGS = ["--rounds", "1", "--candidates", "1", "--max-steps", "3", "--quiet"]


def algorithm1_data(root: Path) -> tuple[list[str], str]:
    """The suite options of the Algorithm 1 run and what they name: the embedded digits where
    scikit-learn (which ships them) is installed; else a stand-in written into ``root``, 1797
    noisy 8x8 images of ten fixed patterns with the digits suite's four tasks (an ``npz``
    source and a ``--config`` file), so that the same code runs on a machine without it."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        pass
    else:
        return ["--suite", "digits"], "the embedded digits"
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(1797) % 10
    patterns = torch.rand(10, 1, 8, 8, generator=gen)
    noise = 0.3 * torch.randn(1797, 1, 8, 8, generator=gen)
    images = (patterns[labels] + noise).clamp(0, 1)
    with (root / "standin.npz").open("wb") as f:
        np.savez(f, x=images.numpy(), y=labels.numpy())
    other = {"other": True}
    config = {
        "name": "digits-standin",
        "source": {"format": "npz", "path": "standin.npz"},
        "arch": "mlp",
        "epsilon": 0.1,
        "train": {"epochs": 40, "batch_size": 64, "lr": 3e-3},
        "tasks": [
            {"name": "detect 0", "classes": [[0]], **other},
            {"name": "detect 6", "classes": [[6]], **other},
            {"name": "0-3 + other", "classes": [0, 1, 2, 3], **other},
            {"name": "all digits", "classes": list(range(10))},
        ],
    }
    (root / "tasks.json").write_text(json.dumps(config))
    return ["--config", str(root / "tasks.json")], "stand-in digits (no scikit-learn here)"


def algorithm1_steps(root: Path, data: list[str]) -> dict[str, list[str]]:
    """The command lines of a short Algorithm 1 in ``root`` on the suite of ``data``: the
    dictionary of its baselines without task 2 (one epoch per probe, 3-node cells), then the
    search for task 2 against it (3 final steps)."""
    return {
        "dictionary build": ["dictionary", "build", *data, "--exclude", "2",
                             "--out", str(root / "dict"), "--epochs", "1", "--nodes", "3"],
        "search": ["search", *data, "--target", "2", "--dictionary", str(root / "dict"),
                   "--out", str(root / "search"), "--final-steps", "3"],
    }  # fmt: skip


def check_algorithm1(device: str, deadline: float) -> None:
    """Algorithm 1 with ``--device`` on the digits (:func:`algorithm1_data`), smallest
    settings, each step a child process (``python -m fisher_fast.cli``, faulthandler on,
    tracebacks shown) that must finish before ``deadline``; the search's report is
    summarised."""
    env = {**os.environ, "FISHER_FAST_TRACEBACK": "1", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="fisher_fast_alg1_") as tmp:
        data, what = algorithm1_data(Path(tmp))
        print(f"\n[algorithm 1] fisher-fast dictionary build + search on {what}, --device {device}")
        for step, args in algorithm1_steps(Path(tmp), data).items():
            left = deadline - time.perf_counter()
            cmd = [sys.executable, "-X", "faulthandler", "-m", "fisher_fast.cli", *args]
            cmd += [*ALGORITHM1_SETTINGS, "--device", device]
            start = time.perf_counter()
            try:
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=max(left, 1), cwd=REPO, env=env
                )
            except subprocess.TimeoutExpired:
                record_bool("algorithm 1", step, False, f"not done in the section's {left:.0f} s")
                return
            seconds = time.perf_counter() - start
            for stream, text in (("stdout", proc.stdout), ("stderr", proc.stderr)):
                lines = text.strip().splitlines()[-12:]
                if lines:
                    print(f"  [{step}: {stream}]\n    " + "\n    ".join(lines))
            ok = proc.returncode == 0
            why = (
                f"{seconds:.1f} s" if ok else f"rc {proc.returncode}: {proc.stderr.strip()[-160:]}"
            )
            record_bool("algorithm 1", f"{step} on {device}", ok, f"{what}; {why}")
            if not ok:
                return
        report = json.loads((Path(tmp) / "search" / "report.json").read_text())
        accuracy = report.get("evaluation", {}).get("test_accuracy", math.nan)
        print(
            f"  a* = {report['closest']}, test accuracy {accuracy:.3f}; probe "
            f"{report['probe_seconds']:.1f} s, search {report['search_seconds']:.1f} s"
        )


# ---------------------------------------------------------------------------------------------
# Timings
# ---------------------------------------------------------------------------------------------
Stamp = Any  # a torch.cuda.Event recorded on the stream, or a time.perf_counter() reading


def stamp(device: str) -> Stamp:
    """Now, on ``device``: an event recorded on the current CUDA stream (so the time between
    two stamps is the GPU's time for the work queued between them), or on the CPU the clock."""
    if torch.device(device).type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def elapsed_ms(start: Stamp, end: Stamp) -> float:
    """Milliseconds between two :func:`stamp` readings (waits for the second one on a GPU)."""
    if isinstance(start, float):
        return (end - start) * 1e3
    end.synchronize()
    return float(start.elapsed_time(end))


def median_ms(fn: Callable[[], object], repeats: int = REPEATS, device: str = "cuda") -> float:
    """Median time of fn() in milliseconds after a warm-up, each run timed by :func:`stamp`
    (CUDA events on a GPU)."""
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(repeats):
        start = stamp(device)
        fn()
        times.append(elapsed_ms(start, stamp(device)))
    return statistics.median(times)


def add_timings(
    kernel: str, shape: str, ours: float, rate: str, baselines: dict[str, float]
) -> None:
    """One summary row per PyTorch baseline, and one printed line for all of them."""
    for what, ms in baselines.items():
        TIMINGS.append(Timing(kernel, shape, ours, ms, what, rate))
    others = ", ".join(f"{what} {ms:.3f} ms" for what, ms in baselines.items())
    print(f"  {shape}: {kernel} {ours:.3f} ms ({rate}); {others}")


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 matrix products and convolutions on (or off) in the body, off again afterwards (the
    check's default: float32 means float32)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def time_frechet(device: str) -> None:
    print(f"\n[timing] frechet_sums, {FRECHET_TIMING_N:.0e} float32 elements per FIM")
    n = FRECHET_TIMING_N
    a = torch.rand(n, device=device)
    others = [torch.rand(n, device=device) for _ in range(4)]

    def naive(bs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The distance written the obvious way: normalise, square roots, norm of the difference."""
        return [((a / a.sum()).sqrt() - (b / b.sum()).sqrt()).norm() / math.sqrt(2.0) for b in bs]

    def dots(bs: list[torch.Tensor]) -> list[torch.Tensor]:
        """One read of every input and nothing else: the memory-bandwidth floor."""
        return [torch.dot(a, b) for b in bs]

    for k in (1, 4):
        ours = median_ms(partial(ops.frechet_sums, [a], others[:k]))
        gbs = 4 * n * (1 + k) / ours / 1e6  # bytes read once each / time
        baselines = {
            "normalised sqrt-diff norm": median_ms(partial(naive, others[:k])),
            "torch.dot (memory floor)": median_ms(partial(dots, others[:k])),
        }
        add_timings("frechet_sums", f"n={n:.0e}, K={k}", ours, f"{gbs:,.0f} GB/s", baselines)


def per_sample_torch(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The same math in plain PyTorch: bmm per sample, square, sum, in chunks of samples."""
    n, b, t, o = g.shape
    i = x.shape[3]
    chunk = max(1, BASELINE_CHUNK_BYTES // (4 * b * o * i))
    out = torch.zeros(b, o, i, device=g.device)
    for s in range(0, n, chunk):
        gc, xc = g[s : s + chunk], x[s : s + chunk]
        m = gc.shape[0]
        prod = torch.bmm(gc.reshape(m * b, t, o).transpose(1, 2), xc.reshape(m * b, t, i))
        out += prod.view(m, b, o, i).square().sum(0)
    return out


def factorised_torch(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """T = 1 only: sum_n (g_n x_n^T)^2 = (g^2)^T (x^2), a single matrix product per block."""
    return torch.bmm(g[:, :, 0].square().permute(1, 2, 0), x[:, :, 0].square().transpose(0, 1))


def time_per_sample(device: str, deadline: float) -> None:
    print("\n[timing] per_sample_sq_sum, float32 in, float32 accumulation")
    torch.manual_seed(3)
    for name, (n, b, t, o, i) in PER_SAMPLE_TIMING.items():
        if spent(deadline, name):
            continue
        g = torch.randn(n, b, t, o, device=device)
        x = torch.randn(n, b, t, i, device=device)
        ours = median_ms(partial(ops.per_sample_sq_sum, g, x, torch.float32))
        flops = 2.0 * n * b * o * i * (t + 1)  # products plus square-and-add
        baselines = {"bmm+square+sum": median_ms(partial(per_sample_torch, g, x))}
        if t == 1:
            baselines["(g^2)^T (x^2)"] = median_ms(partial(factorised_torch, g, x))
        shape = f"{name}: N={n} B={b} T={t} O={o} I={i}"
        add_timings(
            "per_sample_sq_sum", shape, ours, f"{flops / ours / 1e9:,.2f} TFLOP/s", baselines
        )
        for precision in TRITON_PRECISIONS:
            try:
                ms = median_ms(partial(_triton_square_sum, g, x, precision))
            except Exception as exc:  # a failed kernel is reported, the other timings go on
                print(f"  triton {precision} failed: {type(exc).__name__}: {exc}")
                continue
            kernel = f"triton {precision}"
            add_timings(kernel, shape, ms, f"{flops / ms / 1e9:,.2f} TFLOP/s", baselines)


Variants = dict[str, tuple[str, Callable[[], object]]]
"""Our implementations of one layer's product: label -> (Triton precision it matches, call)."""


def time_against_vendor(
    shape: str, flops: float, ours: Variants, vendor: Callable[[], object], what: str, device: str
) -> None:
    """Each of ``ours`` against the vendor's weight gradient of the same batch (``vendor``, the
    cost of that layer in one backward pass) in the same precision: TF32 against ``tf32``,
    float32 against ``ieee`` and ``tf32x3`` (3xTF32 is float32-accurate). The summary's x is
    vendor / ours: the share of the vendor's speed we reach."""
    vendor_ms: dict[bool, float] = {}
    for label, (precision, run) in ours.items():
        try:
            ms = median_ms(run, device=device)
        except Exception as exc:  # a failed kernel is reported, the other timings go on
            print(f"  {shape} {label} failed: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        on = precision == "tf32"
        if on not in vendor_ms:
            with tf32(on):
                vendor_ms[on] = median_ms(vendor, device=device)
        rate = f"{flops / ms / 1e9:,.2f} TFLOP/s"
        add_timings(
            label, shape, ms, rate, {f"{what} ({'tf32' if on else 'float32'})": vendor_ms[on]}
        )


def product_variants(g: torch.Tensor, x: torch.Tensor) -> Variants:
    """Our per-sample square-sum of g (N, 1, T, O) and x (N, 1, T, I): the compiled op in
    float32 where the library is loaded, and the Triton kernel in every precision where
    :func:`triton_expected`."""
    found: Variants = {}
    if fisher_fast.is_loaded():
        run = partial(ops.per_sample_sq_sum, g, x, torch.float32)
        found[f"{g.device.type} op float32"] = ("ieee", run)
    if triton_expected(g.device):
        for precision in TRITON_PRECISIONS:
            found[f"triton {precision}"] = (precision, partial(_triton_square_sum, g, x, precision))
    return found


def time_linear_layers(device: str, deadline: float, scale: int = 1) -> None:
    """GPT-2's linear products (:data:`LINEAR_LAYERS`: Linear, Conv1D and the attention
    projections share them) against cuBLAS's weight gradient g^T x of the same batch."""
    positions = GPT2_T // scale
    cuda = torch.device(device).type == "cuda"
    vendor_name = "cuBLAS wgrad" if cuda else "torch.mm wgrad"
    smaller = f", widths / {scale}" if scale > 1 else ""
    print(f"\n[timing] GPT-2 linear products at T={positions}{smaller} against {vendor_name}")
    torch.manual_seed(10)
    for name, (n, i, o) in LINEAR_LAYERS.items():
        i, o = i // scale, o // scale
        if spent(deadline, name):
            continue
        g = torch.randn(n, 1, positions, o, device=device)
        x = torch.randn(n, 1, positions, i, device=device)
        vendor = partial(torch.mm, g.view(-1, o).t(), x.view(-1, i))
        flops = 2.0 * n * positions * o * i
        shape = f"{name}: N={n} T={positions}"
        time_against_vendor(shape, flops, product_variants(g, x), vendor, vendor_name, device)
        del g, x, vendor
        _free(device)


def time_triton_conv(device: str, deadline: float) -> None:
    """Our per-sample squares of a layer against cuDNN's weight gradient of the same batch (the
    plain backward pass's cost for that layer), in the same precision."""
    print("\n[timing] triton conv2d_square_sum against cuDNN's weight gradient")
    torch.manual_seed(9)
    for name, layer in CONV_LAYERS.items():
        if spent(deadline, name):
            continue
        *_, stride, pad, groups = layer
        x, g, weight_shape = _conv_inputs(layer, device)
        vendor = partial(torch.nn.grad.conv2d_weight, x, weight_shape, g, stride, pad, 1, groups)
        flops = 2.0 * math.prod(g.shape) * math.prod(weight_shape[1:])
        ours: Variants = {
            f"triton conv {p}": (p, partial(_triton_conv, x, g, layer, p))
            for p in TRITON_PRECISIONS
        }
        time_against_vendor(f"{name}: N={x.shape[0]}", flops, ours, vendor, "cuDNN wgrad", device)


# ---------------------------------------------------------------------------------------------
# End to end: diag_fim and its peers against a plain forward and backward pass
# ---------------------------------------------------------------------------------------------
Batch = tuple[torch.Tensor, torch.Tensor]
Method = Callable[[Iterable[Batch]], object]


@dataclass(frozen=True)
class E2E:
    """One end-to-end method: what it runs over the batches, and whether under TF32."""

    run: Method
    tf32: bool = False
    floor: str = "floor"  # the method whose time it is compared with


def stamped(batches: Sequence[Batch], stamps: list[Stamp], device: str) -> Iterator[Batch]:
    """The batches, with a :func:`stamp` taken as each one is asked for and one after the last:
    the time between two stamps is one batch's."""
    for batch in batches:
        stamps.append(stamp(device))
        yield batch
    stamps.append(stamp(device))


@dataclass(frozen=True)
class WarmTiming:
    """A method's median warm-batch time, its peak memory (None on the CPU) and last output."""

    ms: float
    peak: int | None
    output: object


def warm_batch_ms(run: Method, batches: Sequence[Batch], device: str) -> WarmTiming:
    """``run`` over ``batches`` :data:`E2E_CALLS` times; the median time of a warm batch: the
    first call (compilation, allocator) and each call's first batch (where diag_fim plans) are
    left out. Peak memory is what the calls allocated above what was allocated before."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    output: object = None
    for call in range(E2E_CALLS):
        stamps: list[Stamp] = []
        output = run(stamped(batches, stamps, device))
        if call:
            times += [elapsed_ms(a, b) for a, b in itertools.pairwise(stamps[1:])]
    peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
    return WarmTiming(statistics.median(times), peak, output)


def e2e_methods(
    model: torch.nn.Module,
    params: Mapping[str, torch.Tensor],
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    lm: bool,
) -> dict[str, E2E]:
    """The floor (forward and backward), diag_fim on both backends (each where it runs, see
    :func:`triton_expected`; the triton backend also with TF32 products under TF32, against
    the floor under TF32), vmap(grad) in chunks of 4 samples, and the peers that run on GPUs;
    each takes an iterable of batches."""

    def floor(batches: Iterable[Batch]) -> None:
        for x, y in batches:
            torch.autograd.grad(loss(model(x), y).sum(), list(params.values()))

    detached = {n: p.detach() for n, p in params.items()}

    def one(values: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss(torch.func.functional_call(model, values, (x[None],)), y[None]).sum()

    per_sample = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))

    def vmap_grad(batches: Iterable[Batch]) -> None:
        for x, y in batches:
            for xc, yc in zip(x.split(4), y.split(4), strict=True):
                for g in per_sample(detached, xc, yc).values():
                    g.square().sum(0)

    def fim(**options: Any) -> Method:
        return partial(fisher_fast.diag_fim, model, loss=loss, progress=False, **options)

    methods = {"floor": E2E(floor)}
    if fisher_fast.is_loaded():
        methods["diag_fim kernels"] = E2E(fim(backend="kernels"))
    triton = triton_expected(next(iter(params.values())).device)
    if triton:
        methods["diag_fim triton"] = E2E(fim(backend="triton", triton_precision="ieee"))
    methods["vmap(grad)"] = E2E(vmap_grad)
    methods.update({name: E2E(run) for name, run in _peer_methods(model, lm).items()})
    if triton:
        methods["floor tf32"] = E2E(floor, tf32=True, floor="floor tf32")
        tf32_fim = fim(backend="triton", triton_precision="tf32")
        methods["diag_fim triton tf32"] = E2E(tf32_fim, tf32=True, floor="floor tf32")
    return methods


# Whose FIM is checked against the kernels backend's, and within what.
E2E_FIM_CHECKS = {"diag_fim triton": TOL_FIM, "diag_fim triton tf32": TOL_E2E_TF32}


def time_diag_fim(device: str, deadline: float, small: bool = False) -> None:
    """Every method of :func:`e2e_methods` on the GPU issue's models (benchmarks/gpu_models.py;
    ``small``: the same models small), as the median time of a warm batch against the floor's,
    with peak memory; the triton backend's FIM against the kernels backend's. A model or method
    is skipped once ``deadline`` has passed."""
    print(f"\n[timing] end to end: median warm batch over the floor, {E2E_BATCHES} batches a call")
    workloads = gpu_models.small_workloads() if small else gpu_models.issue_workloads()
    gen = torch.Generator().manual_seed(7)
    for name, work in workloads.items():
        if spent(deadline, name):
            continue
        torch.manual_seed(7)
        model = work.build().to(device).eval()
        batches = [work.batch(work.n, device, gen) for _ in range(E2E_BATCHES)]
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        done: dict[str, WarmTiming] = {}
        for method, spec in e2e_methods(model, params, work.loss, work.loss is lm_loss).items():
            if spent(deadline, f"{name} {method}"):
                continue
            try:
                with tf32(spec.tf32):
                    done[method] = warm_batch_ms(spec.run, batches, device)
            except Exception as exc:  # a peer or backend that cannot run this model
                print(f"  {name} {method} failed: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            report_e2e(name, method, done, spec.floor)
        check_e2e_fims(name, done)
        del model, batches, params, done
        _free(device)


def report_e2e(model: str, method: str, done: dict[str, WarmTiming], floor: str) -> None:
    """Print a method's warm-batch time and peak, over its floor's, and add its timing row."""
    ours, base = done[method], done.get(floor)
    peak = "" if ours.peak is None else f", peak {ours.peak / 2**20:.0f} MiB"
    if base is None or method == floor:
        print(f"  {model}: {method} {ours.ms:.2f} ms a batch{peak}")
        return
    ratio = "n/a" if ours.peak is None or not base.peak else f"{ours.peak / base.peak:.2f}x peak"
    print(f"  {model}: {method} {ours.ms:.2f} ms a batch ({ours.ms / base.ms:.2f}x){peak}, {ratio}")
    TIMINGS.append(Timing(method, model, ours.ms, base.ms, floor, ratio))


def check_e2e_fims(model: str, done: dict[str, WarmTiming]) -> None:
    """The triton backend's FIMs of a model (float32 and TF32) against the kernels backend's,
    from the last timed call of each (the same batches)."""
    reference = done.get("diag_fim kernels")
    if reference is None:
        return
    for method, tol in E2E_FIM_CHECKS.items():
        if method in done:
            out, ref = done[method].output.flat, reference.output.flat  # type: ignore[attr-defined]
            note = f"median {median_rel_err(out, ref):.1e}"
            record("end to end", f"{model}: {method} vs kernels", rel_err(out, ref), tol, note)


GPU_PEERS = ("backpack_sum_grad_squared", "opacus_grad_sample")


class _PositionsLast(torch.nn.Module):
    """A language model whose logits (N, T, V) are handed to the peers as (N, V, T), the
    layout their cross-entropy takes with a target per position."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).transpose(1, 2)


def _peer_methods(model: torch.nn.Module, lm: bool) -> dict[str, Method]:
    """BackPACK's and Opacus' empirical diagonal Fisher (benchmarks/fim_baselines.py) over the
    batches, each on its own copy of the model; a peer that is not installed fails when
    called, and is reported so."""
    import fim_baselines  # beside this script

    def run(name: str) -> Method:
        own = copy.deepcopy(_PositionsLast(model) if lm else model)
        method = fim_baselines.METHODS[name].fn

        def call(batches: Iterable[Batch]) -> None:
            for x, y in batches:
                method(own, x, y)

        return call

    return {name: run(name) for name in GPU_PEERS}


# ---------------------------------------------------------------------------------------------
# Sections, their time and the results file
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Section:
    """A part of the check: ``run(device, deadline)``, at most ``cap_s`` seconds, skipped with
    less than ``floor_s`` left for it. ``timing``: left out by --no-timing; ``smoke``: also run
    by --smoke (on the CPU, small)."""

    name: str
    run: Callable[[str, float], None]
    cap_s: float = math.inf
    floor_s: float = 0.0
    timing: bool = False
    smoke: bool = False


def untimed(check: Callable[[str], None]) -> Callable[[str, float], None]:
    """A check that takes no deadline (it is short), as a section's ``run``."""
    return lambda device, deadline: check(device)


def sections(scale: int, e2e_cap_s: float) -> list[Section]:
    """Every section in running order; ``scale`` shrinks the GPT-2 shapes (--smoke)."""
    return [
        Section("frechet_sums", untimed(check_frechet)),
        Section("per_sample_sq_sum", untimed(check_per_sample)),
        Section("bad input", untimed(check_bad_inputs)),
        Section("opcheck", untimed(check_opcheck)),
        Section("diag_fim", untimed(check_diag_fim)),
        Section("triton", untimed(check_triton)),
        Section("triton-conv", untimed(check_triton_conv)),
        Section("gpt2 layers", partial(check_gpt2_layers, scale=scale), 90, 15, smoke=True),
        Section("algorithm 1", check_algorithm1, 90, 20, smoke=True),
        Section("timing frechet_sums", untimed(time_frechet), 20, 5, timing=True),
        Section("timing per_sample_sq_sum", time_per_sample, 40, 10, timing=True),
        Section("timing linear vs cuBLAS", partial(time_linear_layers, scale=scale), 40, 10,
                timing=True, smoke=True),
        Section("timing conv vs cuDNN", time_triton_conv, 50, 10, timing=True),
        Section("timing end to end", partial(time_diag_fim, small=scale > 1), e2e_cap_s, 40,
                timing=True, smoke=True),
    ]  # fmt: skip


def run_sections(chosen: list[Section], device: str, budget_s: float, results: Path | None) -> None:
    """Run each section with its share of what is left of ``budget_s``: at most its cap, and
    the floors of the sections after it (those that still fit) kept back; append each one's
    checks and timings to ``results`` as it finishes. A section that raises is a failed
    check; the others go on."""
    end = time.perf_counter() + budget_s
    for i, section in enumerate(chosen):
        start = time.perf_counter()
        later = sum(s.floor_s for s in chosen[i + 1 :] if s.floor_s <= end - start)
        share = min(section.cap_s, end - start - later)
        checks, timings = len(CHECKS), len(TIMINGS)
        if share < max(section.floor_s, 1.0):
            note = f"{end - start:.0f} s left of {budget_s:.0f}, {later:.0f} s kept for later"
            CHECKS.append(Check(section.name, "skipped: time budget", 0.0, 0.0, "SKIP", note))
            print(f"\n[{section.name}] SKIP ({note})")
        else:
            try:
                section.run(device, start + share)
            except Exception as exc:  # report, do not stop the other sections
                record_bool(section.name, "section ran", False, f"{type(exc).__name__}: {exc}")
        took = time.perf_counter() - start
        write_results(results, f"{section.name}: {took:.1f} s", checks, timings)


def write_results(path: Path | None, header: str, checks: int, timings: int) -> None:
    """Append the checks and timings recorded since indices ``checks`` and ``timings`` to the
    results file under ``header``, and flush it to disk."""
    if path is None:
        return
    lines = [f"== {header}", *(format_check(c) for c in CHECKS[checks:])]
    if len(TIMINGS) > timings:
        lines += [TIMING_HEAD, *(format_timing(r) for r in TIMINGS[timings:])]
    with path.open("a") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def summary() -> int:
    print("\n" + "=" * 100 + "\nSUMMARY")
    if TIMINGS:
        print(f"\n{TIMING_HEAD}")
        for r in TIMINGS:
            print(format_timing(r))
    counts = {s: sum(c.status == s for c in CHECKS) for s in ("PASS", "FAIL", "SKIP")}
    worst: dict[str, float] = {}
    for c in CHECKS:
        if c.status != "SKIP" and c.limit > 0:
            worst[c.section] = max(worst.get(c.section, 0.0), c.value / c.limit)
    print(f"\n{'section':<24} {'checks':>7} {'failed':>7} {'worst error / limit':>20}")
    for section in dict.fromkeys(c.section for c in CHECKS):
        rows = [c for c in CHECKS if c.section == section]
        failed = sum(c.status == "FAIL" for c in rows)
        print(f"{section:<24} {len(rows):>7} {failed:>7} {worst.get(section, 0.0):>20.3f}")
    for c in CHECKS:
        if c.status == "FAIL":
            print(format_check(c))
    print(f"\n{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    return 1 if counts["FAIL"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="check imports and arguments only")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="on the CPU, small: the GPT-2 layer checks, Algorithm 1, the cuBLAS ratios and the "
        "end-to-end timings (the Triton ones where TRITON_INTERPRET=1 lets Triton run there)",
    )
    parser.add_argument("--no-timing", action="store_true", help="correctness checks only")
    parser.add_argument(
        "--device", default=None, help="device to test (default: cuda; cpu with --smoke)"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="seconds for the whole check, shared out among its sections (default 420)",
    )
    parser.add_argument(
        "--model-budget-s",
        type=float,
        default=math.inf,
        help="at most this many seconds of end-to-end model timings (default: what is left)",
    )
    parser.add_argument(
        "--results", type=Path, help="append each section's results to this file as it finishes"
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="WORDS",
        help="run only the sections whose names contain WORDS (repeatable), e.g. 'end to end'",
    )
    parser.add_argument("--bad-input", metavar="CASE", help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.smoke else "cuda")
    faulthandler.enable()  # a crash (SIGSEGV, SIGFPE, abort) prints the Python trace first
    if args.bad_input:
        return run_bad_input(args.bad_input, device)

    if args.dry_run:
        info = fisher_fast.build_info() if fisher_fast.is_loaded() else "library not built"
        print(f"dry run: torch {torch.__version__}, fisher_fast {fisher_fast.__version__}, {info}")
        print(f"dry run: CUDA available: {torch.cuda.is_available()}; nothing was checked")
        return 0
    scale = SMOKE_SCALE if args.smoke else 1
    chosen = [
        s
        for s in sections(scale, args.model_budget_s)
        if (s.smoke or not args.smoke) and not (s.timing and args.no_timing)
        if not args.only or any(words in s.name for words in args.only)
    ]
    if args.smoke:
        print(f"smoke run on {device}: {', '.join(s.name for s in chosen)}")
    elif not torch.cuda.is_available():
        print("error: no CUDA device; run on a GPU machine (or use --dry-run)", file=sys.stderr)
        return 2
    else:
        info = fisher_fast.build_info()
        print(f"build_info: {info}")
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
        if not info.get("cuda_kernels"):
            print(
                "error: fisher_fast was built without CUDA kernels; rebuild with FISHER_FAST_CUDA=1",
                file=sys.stderr,
            )
            return 1
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on both sides
    torch.backends.cudnn.allow_tf32 = False
    run_sections(chosen, device, args.budget_s, args.results)
    status = summary()
    counts = {s: sum(c.status == s for c in CHECKS) for s in ("PASS", "FAIL", "SKIP")}
    write_results(args.results, f"gpu_check: {counts}", len(CHECKS), len(TIMINGS))
    return status


if __name__ == "__main__":
    sys.exit(main())
