"""Compile every Triton kernel of fisher_fast for a GPU architecture, without a GPU.

Triton's interpreter (how the kernels are tested on the CPU) runs the kernels as Python and
accepts code the compiler refuses; this check runs Triton's real front end, its optimisation
passes and ptxas (shipped with Triton) for each kernel in the variants the library launches
(float32 and float64 accumulators, exact float32, TF32, 3xTF32 and BF16 products, float32
inputs and bfloat16 ones, 3x3 and 7x7 geometries, and the kernel that adds a split grid's
partial sums), so that a kernel that would not compile on a GPU fails CI. The sample split
itself is a runtime argument (ranges of samples and the partials' stride), so each variant
covers the split and unsplit grids. For the matrix-product kernels it also reads the PTX for
the precision asked for: TF32 and 3xTF32 must issue TF32 tensor-core instructions (mma or
wgmma), BF16 must issue BF16 ones (after rounding float32 inputs to nearest, ``cvt.rn.bf16``),
exact float32 none. Run without ``TRITON_INTERPRET``:

    python scripts/triton_compile_check.py [--arch 90]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("error: unset TRITON_INTERPRET: the interpreter replaces the compiler this checks")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fisher_fast.fim import triton_conv, triton_products

GEOMETRY_3X3 = dict(KH=3, KW=3, SH=1, SW=1, PH=1, PW=1, DH=1, DW=1)
GEOMETRY_7X7_S2 = dict(KH=7, KW=7, SH=2, SW=2, PH=3, PW=3, DH=1, DW=1)


# (input pointer type, PRECISION) of the matrix-product kernels: float32 inputs in every
# precision, and bfloat16 inputs, which always take the bf16 path (kernel_precision).
PRODUCT_INPUTS = [("fp32", p) for p in triton_products.PRECISIONS] + [("bf16", "bf16")]
# The operand type of the tensor-core instructions each precision must issue (None: none).
MMA_OPERANDS = {"ieee": None, "tf32": "tf32", "tf32x3": "tf32", "bf16": "bf16"}
MMA = re.compile(r"\b(?:wgmma|mma)\.[\w.]*?\.(tf32|bf16|f16)\b")

Variant = tuple[Any, dict[str, Any], str]  # kernel, constexpr values, input pointer type


def variants() -> list[Variant]:
    """(kernel, constexpr values, input pointer type) for every combination the library can
    launch."""
    out: list[Variant] = []
    for acc64 in (False, True):
        for inputs, precision in PRODUCT_INPUTS:
            tiles = dict(ACC_F64=acc64, PRECISION=precision, BLOCK_O=64, BLOCK_I=32)
            out.append((triton_products._square_sum_kernel, dict(tiles, BLOCK_T=16), inputs))
            for geometry in (GEOMETRY_3X3, GEOMETRY_7X7_S2):
                conv = dict(geometry, **tiles, BLOCK_T=16)
                out.append((triton_conv._implicit_gemm_kernel, conv, inputs))
        for geometry, block_k in ((GEOMETRY_3X3, 16), (GEOMETRY_7X7_S2, 64)):
            tile = dict(ACC_F64=acc64, BLOCK_C=16, BLOCK_K=block_k, BLOCK_T=4096 // (16 * block_k))
            for inputs in ("fp32", "bf16"):
                out.append((triton_conv._depthwise_kernel, dict(geometry, **tile), inputs))
        sums = dict(ACC_F64=acc64, BLOCK=triton_products.SUM_BLOCK)
        out.append((triton_products._sum_partials_kernel, sums, "fp32"))
    return out


def compile_for(kernel: Any, constexprs: dict[str, Any], inputs: str, target: GPUTarget) -> Any:
    """Compile one variant; returns Triton's compiled kernel (``.asm`` holds its PTX and cubin).
    Input pointers are of type ``inputs``, the output and partial sums float32 (float64 with a
    float64 accumulator), every other argument a 32-bit integer."""
    signature: dict[str, str] = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("out_ptr", "partials_ptr"):
            signature[name] = "*fp64" if constexprs.get("ACC_F64") else "*fp32"
        elif name.endswith("_ptr"):
            signature[name] = f"*{inputs}"
        else:
            signature[name] = "i32"
    index = {name: i for i, name in enumerate(kernel.arg_names)}
    values = {(index[name],): value for name, value in constexprs.items()}
    return triton.compile(ASTSource(kernel, signature, values), target=target)


def mma_problem(constexprs: dict[str, Any], inputs: str, ptx: str) -> str | None:
    """None when the PTX's tensor-core instructions fit the variant's PRECISION (variants
    without one are not checked) and, for float32 inputs to BF16 products, they are rounded to
    nearest (``cvt.rn``, what the interpreter's emulation reproduces); else what is wrong."""
    if "PRECISION" not in constexprs:
        return None
    wanted = MMA_OPERANDS[constexprs["PRECISION"]]
    found = sorted(set(MMA.findall(ptx)))
    if wanted is None:
        return None if not found else f"exact float32 issues tensor-core {found} instructions"
    if found != [wanted]:
        return f"expected {wanted} tensor-core instructions, found {found or 'none'}"
    if wanted == "bf16" and inputs == "fp32" and "cvt.rn.bf16" not in ptx:
        return "float32 inputs are not rounded to bfloat16 to nearest (no cvt.rn.bf16)"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for kernel, constexprs, inputs in variants():
        label = f"{kernel.__name__} *{inputs} {constexprs}"
        try:
            compiled = compile_for(kernel, constexprs, inputs, target)
        except Exception as exc:  # report every variant, then fail
            failures += 1
            print(f"FAIL {label}: {type(exc).__name__}: {exc}")
            continue
        problem = mma_problem(constexprs, inputs, compiled.asm["ptx"])
        if problem is not None:
            failures += 1
            print(f"FAIL {label}: {problem}")
            continue
        size = len(compiled.asm["cubin"])
        print(f"ok   {label}: {size} bytes for sm_{args.arch}")
    print(f"{len(variants()) - failures} of {len(variants())} variants compiled for sm_{args.arch}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
