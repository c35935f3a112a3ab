// CPU kernel of fisher_fast::per_sample_sq_sum: out[b] = sum_n (g[n,b]^T x[n,b])^2.
//
// Threads take disjoint ranges of samples. Each computes the per-sample products of a few
// samples at a time into a scratch buffer sized to stay in cache (one batched matrix product),
// squares them into its own accumulator, and the accumulators are summed at the end. Memory is
// bounded by threads x (accumulator + scratch), independent of the number of samples.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "fisher_fast/checks.h"

namespace fisher_fast {
namespace {

constexpr int64_t kScratchBytes = 1 << 20;  // per-thread per-sample-product scratch (~L2 size)

template <typename acc_t>
void square_accumulate(const float* __restrict prod, acc_t* __restrict acc, int64_t samples,
                       int64_t size) {
  for (int64_t s = 0; s < samples; ++s) {
    const float* p = prod + s * size;
#pragma omp simd
    for (int64_t j = 0; j < size; ++j) {
      const acc_t v = static_cast<acc_t>(p[j]);
      acc[j] += v * v;
    }
  }
}

template <typename acc_t>
void square_accumulate(const double* __restrict prod, acc_t* __restrict acc, int64_t samples,
                       int64_t size) {
  for (int64_t s = 0; s < samples; ++s) {
    const double* p = prod + s * size;
#pragma omp simd
    for (int64_t j = 0; j < size; ++j) acc[j] += static_cast<acc_t>(p[j] * p[j]);
  }
}

at::Tensor per_sample_sq_sum_cpu(const at::Tensor& g, const at::Tensor& x,
                                 at::ScalarType acc_dtype) {
  FF_CHECK(g.dim() == 4 && x.dim() == 4, "g and x must be 4-D (N, B, T, O) and (N, B, T, I); got ",
           g.sizes(), " and ", x.sizes());
  FF_CHECK(g.size(0) == x.size(0) && g.size(1) == x.size(1) && g.size(2) == x.size(2), "g ",
           g.sizes(), " and x ", x.sizes(), " must agree in samples, blocks and positions");
  FF_CHECK_FLOATING(g, "g");
  FF_CHECK(g.scalar_type() == x.scalar_type(), "g and x must share one dtype");
  FF_CHECK(acc_dtype == at::kFloat || acc_dtype == at::kDouble,
           "acc_dtype must be float32 or float64, got ", acc_dtype);
  FF_CHECK_SAME_DEVICE(g, x, "g", "x");

  const int64_t n = g.size(0), blocks = g.size(1), out_f = g.size(3), in_f = x.size(3);
  // Products run in float32 for reduced-precision inputs and in the input's own type otherwise.
  const auto compute = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto gt = g.to(compute).transpose(2, 3);  // (N, B, O, T)
  const auto xc = x.to(compute);
  const int64_t prod_size = blocks * out_f * in_f;
  const int64_t elem = compute == at::kDouble ? 8 : 4;
  const int64_t per_step =
      std::max<int64_t>(1, kScratchBytes / std::max<int64_t>(1, prod_size * elem));

  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  auto acc = at::zeros({threads, blocks, out_f, in_f}, g.options().dtype(acc_dtype));
  if (n == 0) return acc.sum(0);
  const int64_t per_thread = (n + threads - 1) / threads;

  AT_DISPATCH_FLOATING_TYPES(compute, "per_sample_sq_sum_cpu_compute", [&] {
    using compute_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(acc_dtype, "per_sample_sq_sum_cpu_acc", [&] {
      using acc_t = scalar_t;
      at::parallel_for(0, threads, 1, [&](int64_t t_first, int64_t t_last) {
        for (int64_t t = t_first; t < t_last; ++t) {
          acc_t* my_acc = acc[t].data_ptr<acc_t>();
          const int64_t lo = t * per_thread, hi = std::min(n, lo + per_thread);
          for (int64_t s0 = lo; s0 < hi; s0 += per_step) {
            const int64_t s1 = std::min(hi, s0 + per_step);
            const auto prod = at::matmul(gt.slice(0, s0, s1), xc.slice(0, s0, s1)).contiguous();
            square_accumulate<acc_t>(prod.data_ptr<compute_t>(), my_acc, s1 - s0, prod_size);
          }
        }
      });
    });
  });
  return acc.sum(0);
}

}  // namespace

TORCH_LIBRARY_IMPL(fisher_fast, CPU, m) { m.impl("per_sample_sq_sum", &per_sample_sq_sum_cpu); }

}  // namespace fisher_fast
