// CPU kernel of fisher_fast::frechet_sums: one reference diagonal against K others.
//
// The elements are walked in blocks; inside a block the reference is read from memory once and
// stays in cache while each of the K others is combined with it. Threads own disjoint blocks and
// keep float64 partial sums, merged in a fixed order, so results do not depend on scheduling for
// a given thread count.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "fisher_fast/checks.h"
#include "fisher_fast/frechet_math.h"

namespace fisher_fast {
namespace {

constexpr int64_t kBlock = 4096;

// Partial sums of one block of one pair: sum(other), sum(sqrt(ref*other)), invalid(other).
// Compiled for several instruction sets and picked at load time (AVX-512, AVX2, baseline).
template <typename T>
__attribute__((target_clones("avx512f", "avx2", "default"))) void pair_block_sums(
    const T* __restrict ref, const T* __restrict other, int64_t n, double* out) {
  double sum_other = 0.0, cross = 0.0, invalid = 0.0;
#pragma omp simd reduction(+ : sum_other, cross, invalid)
  for (int64_t i = 0; i < n; ++i) {
    const double a = static_cast<double>(static_cast<float>(ref[i]));
    const double b = static_cast<double>(static_cast<float>(other[i]));
    sum_other += b;
    cross += sqrt_product(a, b);
    invalid += invalid_entry(b);
  }
  out[0] += sum_other;
  out[1] += cross;
  out[2] += invalid;
}

template <>
__attribute__((target_clones("avx512f", "avx2", "default"))) void pair_block_sums<double>(
    const double* __restrict ref, const double* __restrict other, int64_t n, double* out) {
  double sum_other = 0.0, cross = 0.0, invalid = 0.0;
#pragma omp simd reduction(+ : sum_other, cross, invalid)
  for (int64_t i = 0; i < n; ++i) {
    sum_other += other[i];
    cross += sqrt_product(ref[i], other[i]);
    invalid += invalid_entry(other[i]);
  }
  out[0] += sum_other;
  out[1] += cross;
  out[2] += invalid;
}

// Sum and invalid count of one block of the reference.
template <typename T>
__attribute__((target_clones("avx512f", "avx2", "default"))) void ref_block_sums(
    const T* __restrict ref, int64_t n, double* out) {
  double sum = 0.0, invalid = 0.0;
#pragma omp simd reduction(+ : sum, invalid)
  for (int64_t i = 0; i < n; ++i) {
    const double a = static_cast<double>(ref[i]);
    sum += a;
    invalid += invalid_entry(a);
  }
  out[0] += sum;
  out[1] += invalid;
}

// Per-thread accumulator layout: [sum_ref, invalid_ref, then (sum_other, cross, invalid) x K].
template <typename T>
void accumulate_segment(const T* ref, const std::vector<const T*>& others, int64_t numel,
                        std::vector<double>& per_thread, int64_t stride) {
  const int64_t n_blocks = (numel + kBlock - 1) / kBlock;
  at::parallel_for(0, n_blocks, 1, [&](int64_t first, int64_t last) {
    double* acc = per_thread.data() + at::get_thread_num() * stride;
    for (int64_t blk = first; blk < last; ++blk) {
      const int64_t start = blk * kBlock;
      const int64_t len = std::min(kBlock, numel - start);
      ref_block_sums<T>(ref + start, len, acc);
      for (size_t k = 0; k < others.size(); ++k) {
        pair_block_sums<T>(ref + start, others[k] + start, len, acc + 2 + 3 * k);
      }
    }
  });
}

at::Tensor frechet_sums_cpu(at::TensorList ref, at::TensorList others) {
  const int64_t n_seg = static_cast<int64_t>(ref.size());
  FF_CHECK(n_seg > 0, "the reference list is empty");
  FF_CHECK(others.size() % ref.size() == 0, "got ", others.size(),
           " tensors in 'others', which is not a multiple of the ", n_seg,
           " tensors in 'ref'; each other FIM needs one tensor per reference tensor");
  const int64_t k_count = static_cast<int64_t>(others.size()) / n_seg;
  const auto dtype = ref[0].scalar_type();
  for (const auto& t : ref) {
    FF_CHECK_FLOATING(t, "every FIM tensor");
    FF_CHECK(t.scalar_type() == dtype, "all FIM tensors must share one dtype; got ", dtype,
             " and ", t.scalar_type());
    FF_CHECK_CONTIGUOUS(t, "every FIM tensor");
    FF_CHECK(t.device().is_cpu(), "expected CPU tensors, got one on ", t.device());
  }
  for (int64_t k = 0; k < k_count; ++k) {
    for (int64_t s = 0; s < n_seg; ++s) {
      const auto& t = others[k * n_seg + s];
      FF_CHECK(t.scalar_type() == dtype, "all FIM tensors must share one dtype; got ", dtype,
               " and ", t.scalar_type());
      FF_CHECK_CONTIGUOUS(t, "every FIM tensor");
      FF_CHECK_SAME_DEVICE(t, ref[s], "an 'other' tensor", "the reference");
      FF_CHECK(t.numel() == ref[s].numel(), "tensor ", s, " of FIM ", k, " has ", t.numel(),
               " elements but the reference has ", ref[s].numel());
    }
  }

  const int64_t stride = 2 + 3 * k_count;
  std::vector<double> per_thread(static_cast<size_t>(at::get_num_threads() * stride), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "frechet_sums_cpu", [&] {
    for (int64_t s = 0; s < n_seg; ++s) {
      std::vector<const scalar_t*> other_ptrs;
      for (int64_t k = 0; k < k_count; ++k) {
        other_ptrs.push_back(others[k * n_seg + s].data_ptr<scalar_t>());
      }
      accumulate_segment<scalar_t>(ref[s].data_ptr<scalar_t>(), other_ptrs, ref[s].numel(),
                                   per_thread, stride);
    }
  });

  std::vector<double> total(static_cast<size_t>(stride), 0.0);
  for (int64_t t = 0; t < at::get_num_threads(); ++t) {
    for (int64_t j = 0; j < stride; ++j) total[j] += per_thread[t * stride + j];
  }
  auto out = at::empty({k_count, kFrechetColumns}, at::TensorOptions().dtype(at::kDouble));
  auto o = out.accessor<double, 2>();
  for (int64_t k = 0; k < k_count; ++k) {
    o[k][kSumRef] = total[0];
    o[k][kInvalidRef] = total[1];
    o[k][kSumOther] = total[2 + 3 * k];
    o[k][kCross] = total[3 + 3 * k];
    o[k][kInvalidOther] = total[4 + 3 * k];
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fisher_fast, CPU, m) { m.impl("frechet_sums", &frechet_sums_cpu); }

}  // namespace fisher_fast
