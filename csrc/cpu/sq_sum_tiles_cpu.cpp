// The tiled loop of sq_sum_tiles.h and its helpers: the plan, the squaring, the transposes.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "fisher_fast/checks.h"
#include "fisher_fast/gemm_nn.h"
#include "fisher_fast/sq_sum_tiles.h"

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace fisher_fast {
namespace {

constexpr int64_t kTileBytes = 256 << 10;      // scratch tile and product tile, each (L2-resident)
constexpr int64_t kChunkBytes = 512 << 10;     // per-chunk operands held per thread
constexpr int64_t kSplitAccBytes = 512 << 10;  // results up to this: split samples
constexpr int64_t kMinRows = 16;  // fewer result rows per tile than this: split samples
constexpr int64_t kBlock = 16;    // transpose block

#if !defined(__GNUC__)
#error "the CPU kernels use GCC / Clang vector extensions: build with GCC or Clang"
#endif

// Per-ISA clones (resolved at load time) on x86-64; a plain function on other architectures,
// where these target names do not exist.
#if defined(__x86_64__)
#define FF_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FF_CLONES
#endif

// The helpers of a cloned function must be inlined into each clone to get its instruction set:
// a helper left out of line is compiled once, for the baseline.
#define FF_INLINE inline __attribute__((always_inline))

template <typename compute_t, typename acc_t>
FF_CLONES void square_add_impl(const compute_t* __restrict prod, acc_t* __restrict acc,
                               int64_t size) {
#pragma omp simd
  for (int64_t j = 0; j < size; ++j) {
    const acc_t v = static_cast<acc_t>(prod[j]);
    acc[j] += v * v;
  }
}

// Vectors of 64 bytes of compute_t (16 floats or 8 doubles) for the fused products below, and of
// as many acc_t lanes for the sums of their squares: GCC and Clang vector extensions, which each
// clone of FF_CLONES lowers to its own instructions (one AVX-512 register, two AVX2 ones).
template <typename T, int64_t kCount>
struct LanesOf {
  typedef T type __attribute__((vector_size(kCount * sizeof(T))));
};
template <typename compute_t>
constexpr int64_t kLanes = 64 / sizeof(compute_t);
template <typename T, typename compute_t>
using Lanes = typename LanesOf<T, kLanes<compute_t>>::type;

// Unaligned loads and stores of a vector (or of one scalar), and the conversion of its lanes.
template <typename V>
FF_INLINE void load_lanes(V& v, const void* p) {
  std::memcpy(&v, p, sizeof v);
}
template <typename V>
FF_INLINE void store_lanes(void* p, const V& v) {
  std::memcpy(p, &v, sizeof v);
}
template <typename S, typename V>
FF_INLINE void widen(S& w, const V& v) {
  if constexpr (std::is_arithmetic_v<V>) {
    w = static_cast<S>(v);
  } else {
    w = __builtin_convertvector(v, S);
  }
}

// acc (rows × width) += sum_s (a[s] (rows × k, row stride lda) · b[s] (k × width, row stride
// ldb))² over a group of samples, for a short k: blocks of kFusedRows rows × two vectors of
// columns whose products are formed in registers across k and squared there, and whose sums over
// the group's samples stay in registers too, so no product tile is written and each block of the
// result is read and written once per group rather than once per sample. A micro-kernel call
// with so few terms per product spends more on writing and re-reading its product (and the
// result) than on the products themselves.
constexpr int64_t kFusedRows = 4;
constexpr int64_t kFusedMaxPositions = 16;  // up to here the fused loop beat gemm_nn + square_add
constexpr int64_t kFusedSamples = 16;       // samples whose squares one block sums in registers

// The correction (sq_sum_tiles.h) of a group of samples' products over one tile: per sample of
// the group, its shift and scale (the block's width values), and the basis from the tile's first
// row on (row stride: the tile's width).
template <typename T>
struct TileCorrection {
  const T* const* shift;
  const T* const* scale;
  const T* basis;
};

// One block of kRows rows × kVecs values of V (vectors of compute_t, or single values for the
// last columns) at row r0 and column j0; S holds as many acc_t lanes as V. With kCorrect, each
// product is corrected before it is squared.
template <typename V, typename S, int64_t kRows, int64_t kVecs, bool kCorrect, typename compute_t,
          typename acc_t>
FF_INLINE void product_square_add_block(int64_t samples, int64_t k, const compute_t* const* a,
                                        int64_t lda, const compute_t* const* b, int64_t ldb,
                                        int64_t r0, int64_t j0, acc_t* __restrict acc, int64_t ldc,
                                        const TileCorrection<compute_t>& c) {
  constexpr int64_t step = sizeof(V) / sizeof(compute_t);
  S sum[kRows][kVecs];
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t q = 0; q < kVecs; ++q) load_lanes(sum[r][q], acc + r * ldc + q * step);
  }
  V basis[kRows][kVecs];  // the same for every sample: loaded once
  if constexpr (kCorrect) {
    for (int64_t r = 0; r < kRows; ++r) {
      for (int64_t q = 0; q < kVecs; ++q) {
        load_lanes(basis[r][q], c.basis + (r0 + r) * ldc + j0 + q * step);
      }
    }
  }
  for (int64_t s = 0; s < samples; ++s) {
    const compute_t* __restrict as = a[s] + r0 * lda;
    const compute_t* __restrict bs = b[s] + j0;
    V v[kRows][kVecs] = {};
    for (int64_t l = 0; l < k; ++l) {
      V bl[kVecs];
      for (int64_t q = 0; q < kVecs; ++q) load_lanes(bl[q], bs + l * ldb + q * step);
      for (int64_t r = 0; r < kRows; ++r) {
        const compute_t ar = as[r * lda + l];
        for (int64_t q = 0; q < kVecs; ++q) v[r][q] += ar * bl[q];
      }
    }
    if constexpr (kCorrect) {
      for (int64_t q = 0; q < kVecs; ++q) {
        V shift, scale;
        load_lanes(shift, c.shift[s] + j0 + q * step);
        load_lanes(scale, c.scale[s] + j0 + q * step);
        for (int64_t r = 0; r < kRows; ++r) v[r][q] -= shift + scale * basis[r][q];
      }
    }
    for (int64_t r = 0; r < kRows; ++r) {
      for (int64_t q = 0; q < kVecs; ++q) {
        S w;
        widen(w, v[r][q]);
        sum[r][q] += w * w;
      }
    }
  }
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t q = 0; q < kVecs; ++q) store_lanes(acc + r * ldc + q * step, sum[r][q]);
  }
}

// Rows [r0, r0 + kRows) of the result, every column: blocks of two vectors, then one, then single
// columns. Each result row is walked in order, and each sample's b (k × width, in cache) is read
// once per kRows rows.
template <typename compute_t, typename acc_t, int64_t kRows, bool kCorrect>
FF_INLINE void product_square_add_rows(int64_t samples, int64_t width, int64_t k,
                                       const compute_t* const* a, int64_t lda,
                                       const compute_t* const* b, int64_t ldb, int64_t r0,
                                       acc_t* acc, const TileCorrection<compute_t>& c) {
  using V = Lanes<compute_t, compute_t>;
  using S = Lanes<acc_t, compute_t>;
  constexpr int64_t w = kLanes<compute_t>;
  int64_t j = 0;
  for (; j + 2 * w <= width; j += 2 * w) {
    product_square_add_block<V, S, kRows, 2, kCorrect>(samples, k, a, lda, b, ldb, r0, j, acc + j,
                                                       width, c);
  }
  for (; j + w <= width; j += w) {
    product_square_add_block<V, S, kRows, 1, kCorrect>(samples, k, a, lda, b, ldb, r0, j, acc + j,
                                                       width, c);
  }
  for (; j < width; ++j) {
    product_square_add_block<compute_t, acc_t, kRows, 1, kCorrect>(samples, k, a, lda, b, ldb, r0,
                                                                   j, acc + j, width, c);
  }
}

template <typename compute_t, typename acc_t, bool kCorrect>
FF_CLONES void product_square_add_impl(int64_t samples, int64_t rows, int64_t width, int64_t k,
                                       const compute_t* const* a, int64_t lda,
                                       const compute_t* const* b, int64_t ldb,
                                       acc_t* __restrict acc, TileCorrection<compute_t> c) {
  int64_t r = 0;
  for (; r + kFusedRows <= rows; r += kFusedRows) {
    product_square_add_rows<compute_t, acc_t, kFusedRows, kCorrect>(samples, width, k, a, lda, b,
                                                                    ldb, r, acc + r * width, c);
  }
  for (; r < rows; ++r) {
    product_square_add_rows<compute_t, acc_t, 1, kCorrect>(samples, width, k, a, lda, b, ldb, r,
                                                           acc + r * width, c);
  }
}

// prod (rows × width) -= 1 shiftᵀ + basis ⊙ (1 scaleᵀ), basis (rows × width) as prod.
template <typename T>
FF_CLONES void subtract_correction(T* __restrict prod, int64_t rows, int64_t width,
                                   const T* __restrict shift, const T* __restrict scale,
                                   const T* __restrict basis) {
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t j = 0; j < width; ++j)
      prod[r * width + j] -= shift[j] + scale[j] * basis[r * width + j];
  }
}

// dst (cols × rows, row stride ldd) = src (rows × cols, row stride lds)ᵀ over rows [r0, r1) and
// columns [c0, c1), or += with kAdd; float32 moves 4×4 blocks through SSE registers (baseline on
// x86-64), the rest goes element by element.
template <bool kAdd, typename T>
void transpose_block(const T* __restrict src, int64_t lds, int64_t r0, int64_t r1, int64_t c0,
                     int64_t c1, T* __restrict dst, int64_t ldd) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t c = c0; c < c1; ++c) {
      if constexpr (kAdd) {
        dst[c * ldd + r] += src[r * lds + c];
      } else {
        dst[c * ldd + r] = src[r * lds + c];
      }
    }
  }
}

#if defined(__SSE__)
template <bool kAdd>
void transpose_block(const float* __restrict src, int64_t lds, int64_t r0, int64_t r1, int64_t c0,
                     int64_t c1, float* __restrict dst, int64_t ldd) {
  const int64_t r4 = r0 + (r1 - r0) / 4 * 4, c4 = c0 + (c1 - c0) / 4 * 4;
  for (int64_t r = r0; r < r4; r += 4) {
    for (int64_t c = c0; c < c4; c += 4) {
      __m128 v[4];
      for (int64_t i = 0; i < 4; ++i) v[i] = _mm_loadu_ps(src + (r + i) * lds + c);
      _MM_TRANSPOSE4_PS(v[0], v[1], v[2], v[3]);
      for (int64_t i = 0; i < 4; ++i) {
        float* d = dst + (c + i) * ldd + r;
        _mm_storeu_ps(d, kAdd ? _mm_add_ps(_mm_loadu_ps(d), v[i]) : v[i]);
      }
    }
  }
  transpose_block<kAdd, float>(src, lds, r0, r4, c4, c1, dst, ldd);  // right edge
  transpose_block<kAdd, float>(src, lds, r4, r1, c0, c1, dst, ldd);  // bottom edge
}
#endif

// dst (cols × rows, row stride ldd) = (or += with kAdd) src (rows × cols, row stride lds)ᵀ, in
// cache-sized blocks.
template <bool kAdd, typename T>
void transpose_strided(const T* src, int64_t rows, int64_t cols, int64_t lds, T* dst, int64_t ldd) {
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
      transpose_block<kAdd>(src, lds, r0, std::min(rows, r0 + kBlock), c0,
                            std::min(cols, c0 + kBlock), dst, ldd);
    }
  }
}

// Writes a finished tile (rows × width) of sums into the result at its first row, `result`
// holding (height × width) per block, or (width × height) when transposed; adds it there with
// `accumulate`.
template <typename acc_t>
void emit_tile(const acc_t* tile, int64_t rows, int64_t width, acc_t* result, int64_t height,
               bool transposed, bool accumulate) {
  if (transposed) {
    accumulate ? transpose_strided<true>(tile, rows, width, width, result, height)
               : transpose_strided<false>(tile, rows, width, width, result, height);
  } else if (accumulate) {
    for (int64_t j = 0; j < rows * width; ++j) result[j] += tile[j];
  } else {
    std::copy(tile, tile + rows * width, result);
  }
}

}  // namespace

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename compute_t, typename acc_t>
void square_add(const compute_t* prod, acc_t* acc, int64_t size) {
  square_add_impl(prod, acc, size);
}

template <typename T>
void transpose(const T* src, int64_t rows, int64_t cols, T* dst) {
  transpose_strided<false>(src, rows, cols, cols, dst, rows);
}

TilePlan plan_tiles(int64_t n, int64_t blocks, int64_t height, int64_t width, int64_t positions,
                    int64_t chunk_elems, int64_t elem, int64_t threads) {
  const int64_t by_scratch = kTileBytes / std::max<int64_t>(1, positions * elem);
  const int64_t by_product = kTileBytes / std::max<int64_t>(1, width * elem);
  int64_t rows = std::clamp<int64_t>(std::min(by_scratch, by_product), 1, height);
  int64_t tiles = ceil_div(height, rows);
  const int64_t chunk =
      std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, chunk_elems * elem));
  // A small result: every thread takes all tiles for its own share of the samples (each chunk
  // operand is then loaded once, by one thread), with its own accumulator.
  if (blocks * height * width * elem <= kSplitAccBytes && n >= threads) {
    return {ceil_div(height, tiles), tiles, threads, chunk};
  }
  // Otherwise threads own tiles, in whole rounds of items (each thread takes one contiguous
  // range of items, so an uneven count leaves threads idle at the end) unless there are many.
  if (blocks * tiles < 16 * threads) {
    const int64_t per_block = ceil_div(ceil_div(blocks * tiles, threads) * threads, blocks);
    tiles = std::max(tiles, std::min(per_block, ceil_div(height, kMinRows)));
  }
  rows = ceil_div(height, tiles);
  tiles = ceil_div(height, rows);
  const int64_t splits =
      blocks * tiles >= threads ? 1 : std::min(n, ceil_div(threads, blocks * tiles));
  return {rows, tiles, std::max<int64_t>(1, splits), chunk};
}

template <typename compute_t, typename acc_t>
void tiled_sq_sum(const TilePlan& plan, int64_t n, int64_t blocks, int64_t height, int64_t width,
                  int64_t positions, int64_t chunk_elems, at::Tensor& out, bool transposed,
                  bool accumulate, LoadChunk<compute_t> load, Factors<compute_t> factors,
                  const Correction<compute_t>* correction) {
  // Threads that split the samples each sum into a copy of their own (a small result), folded
  // into out at the end.
  checked_mul(plan.splits, out.numel(), "the per-thread accumulators' size");
  const bool split = plan.splits > 1;
  at::Tensor sums = split ? at::empty({plan.splits, out.numel()}, out.options()) : out;
  acc_t* sums_data = sums.data_ptr<acc_t>();
  const bool add_tiles = accumulate && !split;
  const int64_t items = plan.splits * blocks * plan.tiles;
  const int64_t per_split = ceil_div(n, plan.splits);
  gemm_nn_uses_brgemm();  // probe the micro-kernel outside the parallel region
  // The fused path builds the factors of up to `group` samples at once (their scratch rows
  // within one tile's bytes) and sums their squares in registers.
  const bool fused = positions <= kFusedMaxPositions;
  const int64_t scratch_elems = plan.rows * positions;
  const int64_t scratch_bytes = scratch_elems * static_cast<int64_t>(sizeof(compute_t));
  // Samples' buffers lie a cache line more than their size apart: a power-of-two stride (a
  // 512-channel gradient over 4 positions is 8 KiB) would put every sample's rows in the same
  // cache sets, which a group's reads, all samples at once, then evict from each other.
  const int64_t pad = 64 / static_cast<int64_t>(sizeof(compute_t));
  const auto padded = [&](int64_t elems) { return elems == 0 ? 0 : elems + pad; };
  const int64_t chunk_stride = padded(chunk_elems), scratch_stride = padded(scratch_elems);
  const int64_t group = fused
                            ? std::clamp<int64_t>(kTileBytes / std::max<int64_t>(1, scratch_bytes),
                                                  1, std::min(kFusedSamples, plan.chunk))
                            : 1;
  at::parallel_for(0, items, 1, [&](int64_t first, int64_t last) {
    std::vector<compute_t> chunk(plan.chunk * chunk_stride);
    std::vector<compute_t> scratch(group * scratch_stride);
    std::vector<compute_t> prod(fused ? 0 : plan.rows * width);
    // The tile's sums: in place in the result when they are its final values as they stand,
    // else in a buffer emitted into it at the end.
    const bool buffered = transposed || add_tiles;
    std::vector<acc_t> tile_buffer(buffered ? plan.rows * width : 0);
    std::vector<const compute_t*> a(group), b(group), shift(group), scale(group);
    std::vector<compute_t> basis(correction == nullptr ? 0 : plan.rows * width);
    int64_t loaded = -1;  // the (split, block, first sample) whose chunk operands are loaded
    for (int64_t item = first; item < last; ++item) {
      const int64_t part = item / (blocks * plan.tiles);
      const int64_t blk = item / plan.tiles % blocks, t = item % plan.tiles;
      const int64_t r0 = t * plan.rows, r1 = std::min(height, r0 + plan.rows);
      acc_t* result = sums_data + (part * blocks + blk) * height * width;
      acc_t* tile = buffered ? tile_buffer.data() : result + r0 * width;
      std::fill(tile, tile + (r1 - r0) * width, acc_t(0));
      if (correction != nullptr) {  // the tile's rows of the basis, in the products' layout
        transpose_strided<false>(correction->basis + blk * width * height + r0, width, r1 - r0,
                                 height, basis.data(), width);
      }
      const int64_t s_end = std::min(n, (part + 1) * per_split);
      for (int64_t c0 = part * per_split; c0 < s_end; c0 += plan.chunk) {
        const int64_t c1 = std::min(s_end, c0 + plan.chunk);
        if (loaded != (part * blocks + blk) * n + c0) {
          for (int64_t s = c0; s < c1; ++s) load(s, blk, chunk.data() + (s - c0) * chunk_stride);
          loaded = (part * blocks + blk) * n + c0;
        }
        for (int64_t g0 = c0; g0 < c1; g0 += group) {
          const int64_t g1 = std::min(c1, g0 + group);
          for (int64_t s = g0; s < g1; ++s) {
            const auto f = factors(s, blk, r0, r1, chunk.data() + (s - c0) * chunk_stride,
                                   scratch.data() + (s - g0) * scratch_stride);
            a[s - g0] = f.a, b[s - g0] = f.b;
            if (correction != nullptr) {
              shift[s - g0] = correction->shift + (s * blocks + blk) * width;
              scale[s - g0] = correction->scale + (s * blocks + blk) * width;
            }
          }
          const TileCorrection<compute_t> c{shift.data(), scale.data(), basis.data()};
          if (fused && correction != nullptr) {
            product_square_add_impl<compute_t, acc_t, true>(
                g1 - g0, r1 - r0, width, positions, a.data(), positions, b.data(), width, tile, c);
          } else if (fused) {
            product_square_add_impl<compute_t, acc_t, false>(
                g1 - g0, r1 - r0, width, positions, a.data(), positions, b.data(), width, tile, c);
          } else {
            gemm_nn(r1 - r0, width, positions, a[0], positions, b[0], width, prod.data(), width);
            if (correction != nullptr) {
              subtract_correction(prod.data(), r1 - r0, width, shift[0], scale[0], c.basis);
            }
            square_add(prod.data(), tile, (r1 - r0) * width);
          }
        }
      }
      if (buffered) {
        emit_tile(tile, r1 - r0, width, result + (transposed ? r0 : r0 * width), height, transposed,
                  add_tiles);
      }
    }
    gemm_nn_release();
  });
  if (split) {
    const auto total = sums.sum(0).view(out.sizes());
    accumulate ? out.add_(total) : out.copy_(total);
  }
}

#define FF_INSTANTIATE(compute_t, acc_t)                                                        \
  template void tiled_sq_sum<compute_t, acc_t>(                                                 \
      const TilePlan&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, at::Tensor&, bool, \
      bool, LoadChunk<compute_t>, Factors<compute_t>, const Correction<compute_t>*);            \
  template void square_add<compute_t, acc_t>(const compute_t*, acc_t*, int64_t);
FF_INSTANTIATE(float, float)
FF_INSTANTIATE(float, double)
FF_INSTANTIATE(double, float)
FF_INSTANTIATE(double, double)
#undef FF_INSTANTIATE
template void transpose<float>(const float*, int64_t, int64_t, float*);
template void transpose<double>(const double*, int64_t, int64_t, double*);

}  // namespace fisher_fast
