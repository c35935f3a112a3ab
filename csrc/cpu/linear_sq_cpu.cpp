// CPU kernel of fisher_fast::linear_sq_sum_: weight_acc += (g∘g)ᵀ (x∘x) and
// bias_acc += column sums of g∘g, in place (g taken as g∘g itself when g_squared).
//
// A linear layer without extra axes has the per-sample weight gradient g_n x_nᵀ, whose square is
// (g_n∘g_n)(x_n∘x_n)ᵀ, so the sum over samples is one matrix product of squares, added into the
// accumulator by the BLAS (beta = 1). The squares, converted to the accumulator's type, go into a
// workspace owned by the calling thread and kept between calls, so a call allocates nothing the
// size of the batch: freshly allocated pages fault on first write, and on a 784-512-512-10 MLP
// the squares and product of a plain PyTorch formulation took ~1500 page faults per pass, ~10% of
// the floor. The workspace holds at most kWorkspaceBytes; larger batches go in chunks of samples.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "fisher_fast/checks.h"

namespace fisher_fast {
namespace {

constexpr int64_t kWorkspaceBytes = 16 << 20;  // per calling thread, kept between calls
constexpr int64_t kGrainElements = 1 << 15;    // squares per parallel task, at least

// The calling thread's workspace, grown on demand (never beyond kWorkspaceBytes + one row pair).
double* workspace(int64_t bytes) {
  thread_local std::vector<double> buffer;
  const auto doubles = static_cast<size_t>((bytes + 7) / 8);
  if (buffer.size() < doubles) buffer.resize(doubles);
  return buffer.data();
}

// dst[r, :] = src[first + r, :]^2 (converted to work_t; not squared when !square) for r < rows;
// src contiguous (N, cols).
template <typename in_t, typename work_t>
void square_rows(const in_t* src, int64_t first, int64_t rows, int64_t cols, work_t* dst,
                 bool square) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, cols));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const in_t* s = src + (first + r) * cols;
      work_t* d = dst + r * cols;
      if (square) {
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) {
          const auto v = static_cast<work_t>(s[j]);
          d[j] = v * v;
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) d[j] = static_cast<work_t>(s[j]);
      }
    }
  });
}

void check_inputs(const std::optional<at::Tensor>& weight_acc,
                  const std::optional<at::Tensor>& bias_acc, const at::Tensor& g,
                  const at::Tensor& x) {
  FF_CHECK(g.dim() == 2 && x.dim() == 2, "g and x must be 2-D (N, O) and (N, I); got ", g.sizes(),
           " and ", x.sizes());
  FF_CHECK(g.size(0) == x.size(0), "g ", g.sizes(), " and x ", x.sizes(),
           " must have the same number of samples");
  FF_CHECK_FLOATING(g, "g");
  FF_CHECK(g.scalar_type() == x.scalar_type(), "g and x must share one dtype");
  FF_CHECK_SAME_DEVICE(g, x, "g", "x");
  FF_CHECK(weight_acc.has_value() || bias_acc.has_value(),
           "give weight_acc, bias_acc or both: there is nothing to accumulate");
  const auto& any = weight_acc.has_value() ? *weight_acc : *bias_acc;
  FF_CHECK(any.scalar_type() == at::kFloat || any.scalar_type() == at::kDouble,
           "the accumulators must be float32 or float64, got ", any.scalar_type());
  FF_CHECK_SAME_DEVICE(any, g, "the accumulator", "g");
  if (weight_acc.has_value()) {
    FF_CHECK(weight_acc->sizes() == at::IntArrayRef({g.size(1), x.size(1)}),
             "weight_acc has shape ", weight_acc->sizes(), " but g and x need (", g.size(1), ", ",
             x.size(1), ")");
  }
  if (bias_acc.has_value()) {
    FF_CHECK(bias_acc->sizes() == at::IntArrayRef({g.size(1)}), "bias_acc has shape ",
             bias_acc->sizes(), " but g needs (", g.size(1), ",)");
    FF_CHECK(bias_acc->scalar_type() == any.scalar_type(),
             "weight_acc and bias_acc must share one dtype");
  }
}

void linear_sq_sum_cpu(const std::optional<at::Tensor>& weight_acc,
                       const std::optional<at::Tensor>& bias_acc, const at::Tensor& g,
                       const at::Tensor& x, bool g_squared) {
  check_inputs(weight_acc, bias_acc, g, x);
  const auto work = weight_acc.has_value() ? weight_acc->scalar_type() : bias_acc->scalar_type();
  const int64_t n = g.size(0), out_f = g.size(1), in_f = weight_acc.has_value() ? x.size(1) : 0;
  if (n == 0) return;
  const auto gc = g.contiguous();
  const auto xc = x.contiguous();
  const int64_t elem = work == at::kDouble ? 8 : 4;
  const int64_t row_bytes = (out_f + in_f) * elem;
  const int64_t chunk =
      std::clamp<int64_t>(kWorkspaceBytes / std::max<int64_t>(1, row_bytes), 1, n);
  auto* base = workspace(chunk * row_bytes);
  const auto options = g.options().dtype(work);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "linear_sq_in", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(work, "linear_sq_work", [&] {
      using work_t = scalar_t;
      auto* g2_data = reinterpret_cast<work_t*>(base);
      auto* x2_data = g2_data + chunk * out_f;
      for (int64_t first = 0; first < n; first += chunk) {
        const int64_t rows = std::min(chunk, n - first);
        square_rows(gc.data_ptr<in_t>(), first, rows, out_f, g2_data, !g_squared);
        const auto g2 = at::from_blob(g2_data, {rows, out_f}, options);
        if (weight_acc.has_value()) {
          square_rows(xc.data_ptr<in_t>(), first, rows, in_f, x2_data, true);
          weight_acc->addmm_(g2.t(), at::from_blob(x2_data, {rows, in_f}, options));
        }
        if (bias_acc.has_value()) bias_acc->add_(g2.sum(0));
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fisher_fast, CPU, m) { m.impl("linear_sq_sum_", &linear_sq_sum_cpu); }

}  // namespace fisher_fast
