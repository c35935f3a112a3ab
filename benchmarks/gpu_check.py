"""Correctness and speed check of fisher_fast's CUDA kernels, for a machine with a GPU.

Build the package with its CUDA kernels first, then run this script::

    FISHER_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation --no-deps -e .
    python benchmarks/gpu_check.py            # checks, timings and a summary (about a minute)
    python benchmarks/gpu_check.py --dry-run  # imports and arguments only; runs without a GPU

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
  float64 reference, exact float32 (``ieee``, 1e-5) and TF32 (1e-3), and bitwise reproducible;
  ``diag_fim(backend="triton")`` against the CPU on a small sequence model.
* the Triton convolution kernels (implicit GEMM and depthwise, fisher_fast/fim/triton_conv.py)
  at ResNet-18 and EfficientNet-B0 layer shapes against float64 per-sample weight gradients, in
  both precisions, bitwise reproducible.

Errors are max |out - ref| / max |ref| (relative to the largest reference entry). Float32
arithmetic must stay under 1e-5; float64 under 1e-12. Half and bfloat16 inputs are compared with
a reference built from the same rounded values, so they meet the float32 bound too.

Timings: median of many runs timed with CUDA events after a warm-up, against the same math in
plain PyTorch on the GPU (TF32 off, so both sides do float32 arithmetic); the Triton kernel in
both precisions on the same shapes; the Triton convolution kernels against cuDNN's weight
gradient of the same batch in the same precision (the vendor's cost of one backward pass for
that layer); and whole ``diag_fim`` calls (kernels and triton backends) and torch.func
vmap(grad), with their peak memory, over a plain forward and backward pass of the same 4
batches (the floor), on the GPU issue's models in plain torch.nn (benchmarks/gpu_models.py:
a CIFAR ResNet-18 at N = 256, ResNet-18 and ResNet-50 at 224 px, ViT-B/16, a GPT-2-small-like
decoder with its tied head at T = 512), until ``--model-budget-s`` seconds have passed.
"""

from __future__ import annotations

import argparse
import faulthandler
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import gpu_models  # beside this script
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
# Each precision of the Triton products and the error allowed against float64: 3xTF32 splits
# every input into TF32 high and low parts, so it should reach float32's level.
TRITON_PRECISIONS = {"ieee": TOL_F32, "tf32x3": TOL_F32, "tf32": TOL_TF32}


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
# Timings
# ---------------------------------------------------------------------------------------------
def median_ms(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    """Median time of fn() on the GPU in milliseconds, each run timed with CUDA events."""
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def add_timings(
    kernel: str, shape: str, ours: float, rate: str, baselines: dict[str, float]
) -> None:
    """One summary row per PyTorch baseline, and one printed line for all of them."""
    for what, ms in baselines.items():
        TIMINGS.append(Timing(kernel, shape, ours, ms, what, rate))
    others = ", ".join(f"{what} {ms:.3f} ms" for what, ms in baselines.items())
    print(f"  {shape}: ours {ours:.3f} ms ({rate}); {others}")


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


def time_per_sample(device: str) -> None:
    print("\n[timing] per_sample_sq_sum, float32 in, float32 accumulation")
    torch.manual_seed(3)
    for name, (n, b, t, o, i) in PER_SAMPLE_TIMING.items():
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


def time_triton_conv(device: str) -> None:
    """Our per-sample squares of a layer against cuDNN's weight gradient of the same batch (the
    plain backward pass's cost for that layer), float32 and TF32 on both sides."""
    print("\n[timing] triton conv2d_square_sum against cuDNN's weight gradient")
    torch.manual_seed(9)
    for name, layer in CONV_LAYERS.items():
        *_, stride, pad, groups = layer
        x, g, weight_shape = _conv_inputs(layer, device)
        shape = f"{name}: N={x.shape[0]}"
        vendor = partial(torch.nn.grad.conv2d_weight, x, weight_shape, g, stride, pad, 1, groups)
        flops = 2.0 * math.prod(g.shape) * math.prod(weight_shape[1:])
        for precision in TRITON_PRECISIONS:
            tf32 = precision == "tf32"  # 3xTF32 is float32-accurate: against cuDNN's float32
            try:
                ms = median_ms(partial(_triton_conv, x, g, layer, precision))
            except Exception as exc:  # a failed kernel is reported, the other timings go on
                print(f"  {shape} triton {precision} failed: {type(exc).__name__}: {exc}")
                continue
            torch.backends.cudnn.allow_tf32 = tf32
            try:
                label = "tf32" if tf32 else "float32"
                baselines = {f"cuDNN weight grad ({label})": median_ms(vendor)}
            finally:
                torch.backends.cudnn.allow_tf32 = False
            rate = f"{flops / ms / 1e9:,.2f} TFLOP/s"
            add_timings(f"triton conv {precision}", shape, ms, rate, baselines)


def time_diag_fim(device: str, budget_s: float) -> None:
    """Whole diag_fim calls over the floor (forward + backward of the same batches), and
    torch.func vmap(grad) on the same batches (4 per call), with peak memory, for the GPU issue's models
    (benchmarks/gpu_models.py). Models are skipped once ``budget_s`` seconds have passed."""
    print(f"\n[timing] diag_fim over a plain forward+backward, 4 batches, budget {budget_s:.0f} s")
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(7)
    for name, work in gpu_models.issue_workloads().items():
        if time.perf_counter() - start > budget_s:
            print(f"  {name}: skipped (time budget spent)")
            continue
        torch.manual_seed(7)
        model = work.build().to(device).eval()
        batches = [work.batch(work.n, device, gen) for _ in range(4)]
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        methods = _fim_methods(model, batches, params, work.loss)
        floor_ms, floor_peak = _timed_with_peak(methods.pop("floor"), device)
        print(f"  {name}: floor {floor_ms:.1f} ms, peak {floor_peak / 2**20:.0f} MiB")
        for method, run in methods.items():
            try:
                ms, peak = _timed_with_peak(run, device)
            except Exception as exc:  # a peer or backend that cannot run this model
                print(f"  {name} {method} failed: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            print(
                f"  {name}: {method} {ms:.1f} ms ({ms / floor_ms:.2f}x the floor), peak "
                f"{peak / 2**20:.0f} MiB ({peak / floor_peak:.2f}x)"
            )
            TIMINGS.append(
                Timing(method, name, ms, floor_ms, "floor", f"{peak / floor_peak:.2f}x peak")
            )
        del model, batches, params, methods
        torch.cuda.empty_cache()


def _fim_methods(
    model: torch.nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    params: dict[str, torch.Tensor],
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> dict[str, Callable[[], object]]:
    """The floor, diag_fim on both GPU backends, vmap(grad) in chunks of 4 samples, and the
    peers that run on GPUs."""

    def floor() -> None:
        for x, y in batches:
            torch.autograd.grad(loss(model(x), y).sum(), list(params.values()))

    detached = {n: p.detach() for n, p in params.items()}

    def one(values: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss(torch.func.functional_call(model, values, (x[None],)), y[None]).sum()

    per_sample = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))

    def vmap_grad() -> None:
        for x, y in batches:
            for xc, yc in zip(x.split(4), y.split(4), strict=True):
                for g in per_sample(detached, xc, yc).values():
                    g.square().sum(0)

    def fim(backend: str) -> Callable[[], object]:
        return partial(
            fisher_fast.diag_fim, model, batches, loss=loss, backend=backend, progress=False
        )

    return {
        "floor": floor,
        "diag_fim kernels": fim("kernels"),
        "diag_fim triton": fim("triton"),
        "vmap(grad)": vmap_grad,
        **_peer_methods(model, batches, loss is lm_loss),
    }


GPU_PEERS = ("backpack_sum_grad_squared", "opacus_grad_sample")


class _PositionsLast(torch.nn.Module):
    """A language model whose logits (N, T, V) are handed to the peers as (N, V, T), the
    layout their cross-entropy takes with a target per position."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).transpose(1, 2)


def _peer_methods(
    model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], lm: bool
) -> dict[str, Callable[[], object]]:
    """BackPACK's and Opacus' empirical diagonal Fisher (benchmarks/fim_baselines.py) on the
    same batches, each on its own copy of the model; a peer that is not installed fails when
    called, and is reported so."""
    import copy

    import fim_baselines  # beside this script

    def run(name: str) -> Callable[[], object]:
        own = copy.deepcopy(_PositionsLast(model) if lm else model)
        method = fim_baselines.METHODS[name].fn

        def call() -> None:
            for x, y in batches:
                method(own, x, y)

        return call

    return {name: run(name) for name in GPU_PEERS}


def _timed_with_peak(fn: Callable[[], object], device: str) -> tuple[float, int]:
    """Median ms of fn() (CUDA events, 3 timed calls after the warm-up) and the peak memory
    allocated above what was allocated before, in bytes."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    ms = median_ms(fn, repeats=3)
    return ms, torch.cuda.max_memory_allocated(device) - base


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def summary() -> int:
    print("\n" + "=" * 100 + "\nSUMMARY")
    if TIMINGS:
        head = f"{'kernel':<18} {'shape':<52} {'ours ms':>9} {'torch ms':>9} {'x':>6}"
        print(f"\n{head}  {'our rate':>16}  baseline")
        for r in TIMINGS:
            speedup = r.torch_ms / r.ours_ms if r.ours_ms > 0 else math.nan
            print(
                f"{r.kernel:<18} {r.shape:<52} {r.ours_ms:9.3f} {r.torch_ms:9.3f} {speedup:6.1f}  "
                f"{r.rate:>16}  {r.torch_what}"
            )
    counts = {s: sum(c.status == s for c in CHECKS) for s in ("PASS", "FAIL", "SKIP")}
    worst: dict[str, float] = {}
    for c in CHECKS:
        if c.status != "SKIP" and c.limit > 0:
            worst[c.section] = max(worst.get(c.section, 0.0), c.value / c.limit)
    print(f"\n{'section':<12} {'checks':>7} {'failed':>7} {'worst error / limit':>20}")
    for section in dict.fromkeys(c.section for c in CHECKS):
        rows = [c for c in CHECKS if c.section == section]
        failed = sum(c.status == "FAIL" for c in rows)
        print(f"{section:<12} {len(rows):>7} {failed:>7} {worst.get(section, 0.0):>20.3f}")
    for c in CHECKS:
        if c.status == "FAIL":
            print(f"FAIL: [{c.section}] {c.name}: {c.value:.3e} > {c.limit:.0e} {c.note}")
    print(f"\n{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    return 1 if counts["FAIL"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="check imports and arguments only")
    parser.add_argument("--no-timing", action="store_true", help="correctness checks only")
    parser.add_argument("--device", default="cuda", help="CUDA device to test (default: cuda)")
    parser.add_argument(
        "--model-budget-s",
        type=float,
        default=100.0,
        help="seconds of end-to-end model timings before the remaining models are skipped",
    )
    parser.add_argument("--bad-input", metavar="CASE", help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    faulthandler.enable()  # a crash (SIGSEGV, SIGFPE, abort) prints the Python trace first
    if args.bad_input:
        return run_bad_input(args.bad_input, args.device)

    if args.dry_run:
        info = fisher_fast.build_info() if fisher_fast.is_loaded() else "library not built"
        print(f"dry run: torch {torch.__version__}, fisher_fast {fisher_fast.__version__}, {info}")
        print(f"dry run: CUDA available: {torch.cuda.is_available()}; nothing was checked")
        return 0
    if not torch.cuda.is_available():
        print("error: no CUDA device; run on a GPU machine (or use --dry-run)", file=sys.stderr)
        return 2

    info = fisher_fast.build_info()
    print(f"build_info: {info}")
    print(f"device: {torch.cuda.get_device_name(args.device)}, torch {torch.__version__}")
    if not info.get("cuda_kernels"):
        print(
            "error: fisher_fast was built without CUDA kernels; rebuild with FISHER_FAST_CUDA=1",
            file=sys.stderr,
        )
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on both sides
    torch.backends.cudnn.allow_tf32 = False

    check_frechet(args.device)
    check_per_sample(args.device)
    check_bad_inputs(args.device)
    check_opcheck(args.device)
    check_diag_fim(args.device)
    check_triton(args.device)
    check_triton_conv(args.device)
    if not args.no_timing:
        time_frechet(args.device)
        time_per_sample(args.device)
        time_triton_conv(args.device)
        time_diag_fim(args.device, args.model_budget_s)
    return summary()


if __name__ == "__main__":
    sys.exit(main())
