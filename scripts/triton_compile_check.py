"""Compile every Triton kernel of fisher_fast for a GPU architecture, without a GPU.

Triton's interpreter (how the kernels are tested on the CPU) runs the kernels as Python and
accepts code the compiler refuses; this check runs Triton's real front end, its optimisation
passes and ptxas (shipped with Triton) for each kernel in the variants the library launches
(float32 and float64 accumulators, exact float32, TF32 and 3xTF32 products, 3x3 and 7x7
geometries, and the kernel that adds a split grid's partial sums), so that a kernel that would
not compile on a GPU fails CI. The sample split itself is a runtime argument (ranges of samples
and the partials' stride), so each variant covers the split and unsplit grids. Run without ``TRITON_INTERPRET``:

    python scripts/triton_compile_check.py [--arch 90]
"""

from __future__ import annotations

import argparse
import os
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


def variants() -> list[tuple[Any, dict[str, Any]]]:
    """(kernel, constexpr values) for every combination the library can launch."""
    out: list[tuple[Any, dict[str, Any]]] = []
    for acc64 in (False, True):
        for precision in ("ieee", "tf32", "tf32x3"):
            tiles = dict(ACC_F64=acc64, PRECISION=precision, BLOCK_O=64, BLOCK_I=32)
            out.append((triton_products._square_sum_kernel, dict(tiles, BLOCK_T=16)))
            for geometry in (GEOMETRY_3X3, GEOMETRY_7X7_S2):
                out.append((triton_conv._implicit_gemm_kernel, dict(geometry, **tiles, BLOCK_T=16)))
        for geometry, block_k in ((GEOMETRY_3X3, 16), (GEOMETRY_7X7_S2, 64)):
            tile = dict(ACC_F64=acc64, BLOCK_C=16, BLOCK_K=block_k, BLOCK_T=4096 // (16 * block_k))
            out.append((triton_conv._depthwise_kernel, dict(geometry, **tile)))
        sums = dict(ACC_F64=acc64, BLOCK=triton_products.SUM_BLOCK)
        out.append((triton_products._sum_partials_kernel, sums))
    return out


def compile_for(kernel: Any, constexprs: dict[str, Any], target: GPUTarget) -> int:
    """Compile one variant; returns the size of its binary in bytes. Pointers are float32
    (the output and partial sums float64 with a float64 accumulator), every other argument a
    32-bit integer."""
    signature: dict[str, str] = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            wide = name in ("out_ptr", "partials_ptr") and constexprs.get("ACC_F64")
            signature[name] = "*fp64" if wide else "*fp32"
        else:
            signature[name] = "i32"
    index = {name: i for i, name in enumerate(kernel.arg_names)}
    values = {(index[name],): value for name, value in constexprs.items()}
    compiled = triton.compile(ASTSource(kernel, signature, values), target=target)
    return len(compiled.asm["cubin"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for kernel, constexprs in variants():
        label = f"{kernel.__name__} {constexprs}"
        try:
            size = compile_for(kernel, constexprs, target)
        except Exception as exc:  # report every variant, then fail
            failures += 1
            print(f"FAIL {label}: {type(exc).__name__}: {exc}")
            continue
        print(f"ok   {label}: {size} bytes for sm_{args.arch}")
    print(f"{len(variants()) - failures} of {len(variants())} variants compiled for sm_{args.arch}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
