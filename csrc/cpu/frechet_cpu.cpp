// CPU kernel of fisher_fast::frechet_sums: one reference diagonal against K others.
//
// Work split: each tensor's elements are cut into blocks of kBlock, and the blocks into at most
// one contiguous chunk per thread. Every chunk keeps its own float64 sums, merged in chunk order,
// so the result does not depend on scheduling for a given thread count. A group of blocks of the
// reference is read from memory once and stays in L2 while each of the K others is combined with
// it in turn; the reference's own sums are taken in the pass of the first other.
//
// Speed: the data are read once, so the floor is memory bandwidth (a dot product of the same
// inputs). What stands in the way is the float64 square root of each product: vsqrtpd alone
// runs at about 2 cycles per element, several times slower than memory. The cross sum must stay
// float64-accurate (near d = 1e-6 the result is 1 minus it, to 1e-12), so a float32 root is no
// option. On AVX-512 CPUs float32 input therefore takes a hand-vectorised path that spreads the
// roots over two execution units: two vectors in three get a float64 root from vrsqrt14pd and
// a third-order correction on the FMA pipes (within 1 ulp of the exact root), the third one a
// vsqrtpd on the divider, which runs in parallel. That path also leaves the invalid-entry count
// out of the per-element work: a block's float64 sum and float32 minimum show whether it can
// hold an invalid entry, and only such a block is counted element by element (classifying and
// counting every vector cost about a quarter of the kernel's time). Other dtypes and CPUs use a
// portable loop that the compiler vectorises for AVX-512, AVX2 and the baseline (target_clones).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "fisher_fast/frechet_checks.h"
#include "fisher_fast/frechet_math.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FF_X86_64 1
#define FF_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define FF_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl")))
#else
#define FF_X86_64 0
#define FF_CLONES
#endif

namespace fisher_fast {
namespace {

// Elements per block. Each block's sums are taken in short float64 chains (at most ~50 additions
// per vector lane on the AVX-512 path) and added to the chunk's sums with compensation, so the
// rounding error of a sum stays near 1e-16 relative however many elements there are. A float32
// block is 4 KiB: the reference block stays in L1 while the K others are combined with it.
constexpr int64_t kBlock = 1024;
constexpr int64_t kMinBlocksPerChunk = 32;  // below this much work per thread, stay serial
// Bytes of the reference taken against each other in turn (kept in a core's 1 MiB of L2): each
// thread then streams the reference and one other from memory at a time. Interleaving every
// other block by block made 2 threads x (K + 1) streams, which ran at a third of the memory
// bandwidth for K >= 2 (1 to 4 MiB were fastest of 16 KiB to 16 MiB). Each pair's block sums
// are still added in block order, so the sums are the same as block by block.
constexpr int64_t kGroupBytes = 1 << 20;

// Sums of one block of one (reference, other) pair; the ref_* fields only when asked for.
struct BlockSums {
  double sum_ref = 0.0, invalid_ref = 0.0, sum_other = 0.0, cross = 0.0, invalid_other = 0.0;
};

template <typename T>
using BlockFn = BlockSums (*)(const T*, const T*, int64_t);

// A float64 sum that keeps the rounding error of every addition (Neumaier's variant of Kahan
// summation), for the long chains of block sums. Once the sum is infinite or NaN (an infinite
// entry, or a sum past the float64 range) it is the answer as it stands, as in plain float64
// summation: its error term would be inf - inf = NaN, so it is no longer updated.
class CompensatedSum {
 public:
  void add(double x) {
    const double t = sum_ + x;
    if (std::isfinite(t)) comp_ += std::abs(sum_) >= std::abs(x) ? (sum_ - t) + x : (x - t) + sum_;
    sum_ = t;
  }
  double value() const { return sum_ + comp_; }

 private:
  double sum_ = 0.0, comp_ = 0.0;
};

// An element in float64; float16 and bfloat16 go through float32, where they are exact.
template <typename T>
inline double widen(T v) {
  return static_cast<double>(static_cast<float>(v));
}
inline double widen(double v) { return v; }

// Portable block sums, vectorised by the compiler for each instruction set in FF_CLONES. The
// block is summed in runs of kRun elements (at most 32 additions per vector lane with AVX-512,
// 64 with AVX2), and the runs' sums are added with compensation.
constexpr int64_t kRun = 256;

template <typename T, bool kWithRef>
FF_CLONES BlockSums block_sums_portable(const T* __restrict ref, const T* __restrict other,
                                        int64_t n) {
  CompensatedSum sum_ref, sum_other, cross;
  double invalid_ref = 0.0, invalid_other = 0.0;
  for (int64_t start = 0; start < n; start += kRun) {
    const int64_t end = std::min(n, start + kRun);
    double run_ref = 0.0, run_other = 0.0, run_cross = 0.0;
#pragma omp simd reduction(+ : run_ref, run_other, run_cross, invalid_ref, invalid_other)
    for (int64_t i = start; i < end; ++i) {
      const double a = widen(ref[i]);
      const double b = widen(other[i]);
      if constexpr (kWithRef) {
        run_ref += a;
        invalid_ref += invalid_entry(a);
      }
      run_other += b;
      run_cross += sqrt_product(a, b);
      invalid_other += invalid_entry(b);
    }
    sum_ref.add(run_ref);
    sum_other.add(run_other);
    cross.add(run_cross);
  }
  return {sum_ref.value(), invalid_ref, sum_other.value(), cross.value(), invalid_other};
}

#if FF_X86_64
// GCC 12's intrinsics headers trip -W(maybe-)uninitialized on their own _mm512_undefined_*().
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// sqrt(p) for p >= 0 in float64 from the 14-bit estimate y ~ 1/sqrt(p): with s = p*y and
// r = 1 - s*y, sqrt(p) = s (1 - r)^(-1/2) = s (1 + r/2 + 3r^2/8 + 5r^3/16 + O(r^4)). |r| < 2^-13,
// so the dropped term is below 2^-53 relative; s's own rounding cancels through r. Lanes of +0,
// -0 and +inf are their own roots and are passed through (the estimate would give 0 * inf = NaN
// there); NaN and negative lanes give NaN, as vsqrtpd does.
constexpr int kOwnRootClasses = 0x02 | 0x04 | 0x08;  // vfpclasspd: +0, -0, +inf

FF_AVX512 inline __m512d sqrt_fma(__m512d p) {
  const __mmask8 own_root = _mm512_fpclass_pd_mask(p, kOwnRootClasses);
  const __m512d y = _mm512_maskz_rsqrt14_pd(static_cast<__mmask8>(~own_root), p);
  const __m512d s = _mm512_mul_pd(p, y);
  const __m512d r = _mm512_fnmadd_pd(s, y, _mm512_set1_pd(1.0));
  __m512d q = _mm512_fmadd_pd(r, _mm512_set1_pd(5.0 / 16.0), _mm512_set1_pd(3.0 / 8.0));
  q = _mm512_fmadd_pd(r, q, _mm512_set1_pd(0.5));
  return _mm512_mask_mov_pd(_mm512_fmadd_pd(_mm512_mul_pd(s, r), q, s), own_root, p);
}

// Eight float64 lanes of each input and of their root products, and the eight-lane minimum of
// each input in float32: what eight float32 elements contribute to a block's sums, or a running
// total of such contributions.
struct Lanes {
  __m512d a, b, root;
  __m256 min_a, min_b;
};

FF_AVX512 inline Lanes operator+(const Lanes& x, const Lanes& y) {
  return {_mm512_add_pd(x.a, y.a), _mm512_add_pd(x.b, y.b), _mm512_add_pd(x.root, y.root),
          _mm256_min_ps(x.min_a, y.min_a), _mm256_min_ps(x.min_b, y.min_b)};
}

// The contribution of ref[0, 8) and other[0, 8); lanes outside `live` read as zero, which adds
// nothing. kDividerSqrt picks vsqrtpd over sqrt_fma for the root.
template <bool kDividerSqrt>
FF_AVX512 inline Lanes load_lanes(const float* ref, const float* other, __mmask8 live) {
  const __m256 a32 = _mm256_maskz_loadu_ps(live, ref);
  const __m256 b32 = _mm256_maskz_loadu_ps(live, other);
  const __m512d a = _mm512_cvtps_pd(a32);
  const __m512d b = _mm512_cvtps_pd(b32);
  const __m512d p = _mm512_mul_pd(a, b);
  return {a, b, kDividerSqrt ? _mm512_sqrt_pd(p) : sqrt_fma(p), a32, b32};
}

// Number of invalid entries (see invalid_entry) in x[0, n).
inline double count_invalid(const float* x, int64_t n) {
  double count = 0.0;
  for (int64_t i = 0; i < n; ++i) count += invalid_entry(x[i]);
  return count;
}

// Whether a block may hold an invalid entry, from its float64 sum and float32 minimum: a negative
// entry (-0.0 is not) makes the minimum negative, and a NaN or infinite one makes the sum NaN or
// infinite (the sum of a block of finite float32 values cannot overflow float64). The minimum
// can lose a NaN (vminps returns its second operand then), the sum cannot.
FF_AVX512 inline bool may_hold_invalid(double sum, __m256 min8) {
  const __m128 m4 = _mm_min_ps(_mm256_castps256_ps128(min8), _mm256_extractf128_ps(min8, 1));
  const __m128 m2 = _mm_min_ps(m4, _mm_movehl_ps(m4, m4));
  const float lowest = _mm_cvtss_f32(_mm_min_ss(m2, _mm_shuffle_ps(m2, m2, 1)));
  return !(lowest >= 0.0f) || !std::isfinite(sum);
}

// Block sums for float32 on AVX-512 CPUs (see the file comment). Groups of three vectors (24
// elements) are summed first and then added to the running total, which keeps the chains short.
// Invalid entries are counted element by element only in a block whose sum or minimum shows one,
// which keeps the per-element work to the sums and roots.
template <bool kWithRef>
FF_AVX512 BlockSums block_sums_avx512(const float* ref, const float* other, int64_t n) {
  const __m512d zero = _mm512_setzero_pd();
  const __m256 zero8 = _mm256_setzero_ps();
  Lanes total{zero, zero, zero, zero8, zero8};
  int64_t i = 0;
  for (; i + 24 <= n; i += 24) {
    total = total + (load_lanes<false>(ref + i, other + i, 0xFF) +
                     load_lanes<false>(ref + i + 8, other + i + 8, 0xFF) +
                     load_lanes<true>(ref + i + 16, other + i + 16, 0xFF));
  }
  for (; i < n; i += 8) {
    const int64_t left = n - i;
    const __mmask8 live = left >= 8 ? 0xFF : static_cast<__mmask8>((1u << left) - 1u);
    total = total + load_lanes<false>(ref + i, other + i, live);
  }
  BlockSums out;
  if constexpr (kWithRef) {
    out.sum_ref = _mm512_reduce_add_pd(total.a);
    if (may_hold_invalid(out.sum_ref, total.min_a)) out.invalid_ref = count_invalid(ref, n);
  }
  out.sum_other = _mm512_reduce_add_pd(total.b);
  out.cross = _mm512_reduce_add_pd(total.root);
  if (may_hold_invalid(out.sum_other, total.min_b)) out.invalid_other = count_invalid(other, n);
  return out;
}

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
}

#pragma GCC diagnostic pop
#endif  // FF_X86_64

// The fastest block function for this dtype on this CPU.
template <typename T, bool kWithRef>
BlockFn<T> block_fn() {
#if FF_X86_64
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx512()) return &block_sums_avx512<kWithRef>;
  }
#endif
  return &block_sums_portable<T, kWithRef>;
}

// Slots of one chunk's sums: [sum ref, invalid ref, then (sum other, cross, invalid other) x K].
constexpr int64_t kRefSlots = 2;
constexpr int64_t kPairSlots = 3;

// Adds the sums of one tensor (segment) of the FIMs to the per-chunk sums `chunk_acc`.
template <typename T>
void accumulate_segment(const T* ref, const std::vector<const T*>& others, int64_t numel,
                        std::vector<CompensatedSum>& chunk_acc, int64_t stride) {
  const BlockFn<T> with_ref = block_fn<T, true>();
  const BlockFn<T> without_ref = block_fn<T, false>();
  const int64_t n_blocks = (numel + kBlock - 1) / kBlock;
  const int64_t group_blocks =
      std::max<int64_t>(1, kGroupBytes / (kBlock * static_cast<int64_t>(sizeof(T))));
  const int64_t max_chunks = static_cast<int64_t>(chunk_acc.size()) / stride;
  const int64_t n_chunks = std::max<int64_t>(
      1, std::min(max_chunks, (n_blocks + kMinBlocksPerChunk - 1) / kMinBlocksPerChunk));
  at::parallel_for(0, n_chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      // Summed here, stored at the end: chunks' sums side by side in chunk_acc share cache lines.
      std::vector<CompensatedSum> acc(chunk_acc.begin() + c * stride,
                                      chunk_acc.begin() + (c + 1) * stride);
      const int64_t chunk_end = (c + 1) * n_blocks / n_chunks;
      for (int64_t group = c * n_blocks / n_chunks; group < chunk_end; group += group_blocks) {
        const int64_t group_end = std::min(chunk_end, group + group_blocks);
        for (size_t k = 0; k < others.size(); ++k) {
          CompensatedSum* pair = acc.data() + kRefSlots + kPairSlots * k;
          for (int64_t blk = group; blk < group_end; ++blk) {
            const int64_t start = blk * kBlock;
            const int64_t len = std::min(kBlock, numel - start);
            const BlockSums s =
                (k == 0 ? with_ref : without_ref)(ref + start, others[k] + start, len);
            if (k == 0) {
              acc[0].add(s.sum_ref);
              acc[1].add(s.invalid_ref);
            }
            pair[0].add(s.sum_other);
            pair[1].add(s.cross);
            pair[2].add(s.invalid_other);
          }
        }
      }
      std::copy(acc.begin(), acc.end(), chunk_acc.begin() + c * stride);
    }
  });
}

at::Tensor frechet_sums_cpu(at::TensorList ref, at::TensorList others) {
  check_frechet_inputs(ref, others, c10::DeviceType::CPU);
  const int64_t n_seg = static_cast<int64_t>(ref.size());
  const int64_t k_count = static_cast<int64_t>(others.size()) / n_seg;
  const int64_t stride = kRefSlots + kPairSlots * k_count;
  std::vector<CompensatedSum> chunk_acc(static_cast<size_t>(at::get_num_threads() * stride));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, ref[0].scalar_type(), "frechet_sums_cpu", [&] {
        for (int64_t s = 0; s < n_seg; ++s) {
          std::vector<const scalar_t*> other_ptrs;
          for (int64_t k = 0; k < k_count; ++k) {
            other_ptrs.push_back(others[k * n_seg + s].data_ptr<scalar_t>());
          }
          accumulate_segment<scalar_t>(ref[s].data_ptr<scalar_t>(), other_ptrs, ref[s].numel(),
                                       chunk_acc, stride);
        }
      });

  std::vector<CompensatedSum> total(static_cast<size_t>(stride));
  for (size_t i = 0; i < chunk_acc.size(); ++i) total[i % stride].add(chunk_acc[i].value());
  auto out = at::empty({k_count, kFrechetColumns}, at::TensorOptions().dtype(at::kDouble));
  auto o = out.accessor<double, 2>();
  for (int64_t k = 0; k < k_count; ++k) {
    const CompensatedSum* pair = total.data() + kRefSlots + kPairSlots * k;
    o[k][kSumRef] = total[0].value();
    o[k][kInvalidRef] = total[1].value();
    o[k][kSumOther] = pair[0].value();
    o[k][kCross] = pair[1].value();
    o[k][kInvalidOther] = pair[2].value();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fisher_fast, CPU, m) { m.impl("frechet_sums", &frechet_sums_cpu); }

}  // namespace fisher_fast
