// Per-element math of the Fréchet distance of diagonal FIMs, shared by host and device code.
//
// For raw diagonals A and B (not normalised), the distance of their unit-trace versions is
//   d^2 = 1 - sum_i sqrt(A_i B_i) / sqrt(sum A * sum B)
// so one pass accumulates three sums; each element also reports whether it is a valid FIM
// entry (finite and nonnegative), so bad input is detected in the same pass.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define FF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FF_HOST_DEVICE inline
#endif

namespace fisher_fast {

// Columns of the (K, 5) float64 result of the frechet_sums op.
enum FrechetColumn : int {
  kSumRef = 0,      // sum of the reference diagonal
  kSumOther = 1,    // sum of the k-th other diagonal
  kCross = 2,       // sum_i sqrt(ref_i * other_i)
  kInvalidRef = 3,  // number of negative, NaN or infinite entries in the reference
  kInvalidOther = 4,
  kFrechetColumns = 5
};

// 1 when v is not a valid diagonal-FIM entry (negative, NaN or +-inf), else 0.
FF_HOST_DEVICE double invalid_entry(double v) {
  return (v >= 0.0 && v <= 1.7976931348623157e308) ? 0.0 : 1.0;
}

// sqrt(a * b) in float64: the product of two float32 values is exact in float64, so the only
// rounding is the square root's; float32 arithmetic here would swamp distances near 1e-6.
FF_HOST_DEVICE double sqrt_product(double a, double b) { return sqrt(a * b); }

}  // namespace fisher_fast
