// The tiled loop of sq_sum_tiles.h and its helpers: the plan, the squaring, the transposes.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <vector>

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

// Per-ISA clones (resolved at load time) where the compiler supports them for x86-64; a plain
// function on other architectures, where these target names do not exist.
#if defined(__x86_64__) && defined(__GNUC__)
#define FF_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FF_CLONES
#endif

template <typename compute_t, typename acc_t>
FF_CLONES void square_add_impl(const compute_t* __restrict prod, acc_t* __restrict acc,
                               int64_t size) {
#pragma omp simd
  for (int64_t j = 0; j < size; ++j) {
    const acc_t v = static_cast<acc_t>(prod[j]);
    acc[j] += v * v;
  }
}

// acc (rows × width) += (a (rows × k, row stride lda) · b (k × width, row stride ldb))², for a
// short k: blocks of kFusedRows rows × kFusedCols columns whose sums are formed in registers
// across k and squared there, so no product tile is written and each row of b is read once per
// block of rows. A micro-kernel call with so few terms per product spends more on writing and
// re-reading its product than on the products themselves.
constexpr int64_t kFusedRows = 4;
constexpr int64_t kFusedMaxPositions = 16;  // up to here the fused loop beat gemm_nn + square_add
constexpr int64_t kFusedCols = 16;

// One block of kRows rows and kCols columns (kCols <= kFusedCols; whole blocks have it fixed, so
// the column loops become vector instructions on registers).
template <typename compute_t, typename acc_t, int64_t kRows, int64_t kCols>
inline void product_square_add_block(int64_t k, const compute_t* __restrict a, int64_t lda,
                                     const compute_t* __restrict b, int64_t ldb,
                                     acc_t* __restrict acc, int64_t ldc, int64_t cols = kCols) {
  compute_t v[kRows][kFusedCols] = {};
  for (int64_t l = 0; l < k; ++l) {
    const compute_t* bl = b + l * ldb;
    for (int64_t r = 0; r < kRows; ++r) {
      const compute_t ar = a[r * lda + l];
#pragma omp simd
      for (int64_t j = 0; j < (kCols > 0 ? kCols : cols); ++j) v[r][j] += ar * bl[j];
    }
  }
  for (int64_t r = 0; r < kRows; ++r) {
#pragma omp simd
    for (int64_t j = 0; j < (kCols > 0 ? kCols : cols); ++j) {
      acc[r * ldc + j] += static_cast<acc_t>(v[r][j]) * static_cast<acc_t>(v[r][j]);
    }
  }
}

// Rows [0, kRows) of the result, every column, a block of kFusedCols columns at a time: each
// result row is walked in order, and b (k × width, in cache) is read once per kRows rows.
template <typename compute_t, typename acc_t, int64_t kRows>
inline void product_square_add_rows(int64_t width, int64_t k, const compute_t* a, int64_t lda,
                                    const compute_t* b, int64_t ldb, acc_t* acc) {
  const int64_t whole = width / kFusedCols * kFusedCols;
  for (int64_t j0 = 0; j0 < whole; j0 += kFusedCols) {
    product_square_add_block<compute_t, acc_t, kRows, kFusedCols>(k, a, lda, b + j0, ldb, acc + j0,
                                                                  width);
  }
  if (whole < width) {  // the last columns, fewer than a block
    product_square_add_block<compute_t, acc_t, kRows, 0>(k, a, lda, b + whole, ldb, acc + whole,
                                                         width, width - whole);
  }
}

template <typename compute_t, typename acc_t>
FF_CLONES void product_square_add_impl(int64_t rows, int64_t width, int64_t k,
                                       const compute_t* __restrict a, int64_t lda,
                                       const compute_t* __restrict b, int64_t ldb,
                                       acc_t* __restrict acc) {
  int64_t r = 0;
  for (; r + kFusedRows <= rows; r += kFusedRows) {
    product_square_add_rows<compute_t, acc_t, kFusedRows>(width, k, a + r * lda, lda, b, ldb,
                                                          acc + r * width);
  }
  for (; r < rows; ++r) {
    product_square_add_rows<compute_t, acc_t, 1>(width, k, a + r * lda, lda, b, ldb,
                                                 acc + r * width);
  }
}

// dst (cols × rows) = src (rows × cols)ᵀ over rows [r0, r1) and columns [c0, c1); float32 moves
// 4×4 blocks through SSE registers (baseline on x86-64), the rest goes element by element.
template <typename T>
void transpose_block(const T* __restrict src, int64_t rows, int64_t cols, int64_t r0, int64_t r1,
                     int64_t c0, int64_t c1, T* __restrict dst) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t c = c0; c < c1; ++c) dst[c * rows + r] = src[r * cols + c];
  }
}

#if defined(__SSE__)
void transpose_block(const float* __restrict src, int64_t rows, int64_t cols, int64_t r0,
                     int64_t r1, int64_t c0, int64_t c1, float* __restrict dst) {
  const int64_t r4 = r0 + (r1 - r0) / 4 * 4, c4 = c0 + (c1 - c0) / 4 * 4;
  for (int64_t r = r0; r < r4; r += 4) {
    for (int64_t c = c0; c < c4; c += 4) {
      __m128 a = _mm_loadu_ps(src + r * cols + c), b = _mm_loadu_ps(src + (r + 1) * cols + c);
      __m128 e = _mm_loadu_ps(src + (r + 2) * cols + c), d = _mm_loadu_ps(src + (r + 3) * cols + c);
      _MM_TRANSPOSE4_PS(a, b, e, d);
      _mm_storeu_ps(dst + c * rows + r, a);
      _mm_storeu_ps(dst + (c + 1) * rows + r, b);
      _mm_storeu_ps(dst + (c + 2) * rows + r, e);
      _mm_storeu_ps(dst + (c + 3) * rows + r, d);
    }
  }
  transpose_block<float>(src, rows, cols, r0, r4, c4, c1, dst);  // right edge
  transpose_block<float>(src, rows, cols, r4, r1, c0, c1, dst);  // bottom edge
}
#endif

template <typename T>
at::Tensor transposed_blocks_of(const at::Tensor& src) {
  const int64_t blocks = src.size(0), rows = src.size(1), cols = src.size(2);
  auto dst = at::empty({blocks, cols, rows}, src.options());
  const T* s = src.data_ptr<T>();
  T* d = dst.data_ptr<T>();
  const int64_t row_blocks = ceil_div(rows, kBlock);
  at::parallel_for(0, blocks * row_blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t item = first; item < last; ++item) {
      const int64_t b = item / row_blocks, r0 = item % row_blocks * kBlock;
      const int64_t r1 = std::min(rows, r0 + kBlock);
      for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
        transpose_block(s + b * rows * cols, rows, cols, r0, r1, c0, std::min(cols, c0 + kBlock),
                        d + b * rows * cols);
      }
    }
  });
  return dst;
}

}  // namespace

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename compute_t, typename acc_t>
void square_add(const compute_t* prod, acc_t* acc, int64_t size) {
  square_add_impl(prod, acc, size);
}

template <typename T>
void transpose(const T* src, int64_t rows, int64_t cols, T* dst) {
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
      transpose_block(src, rows, cols, r0, std::min(rows, r0 + kBlock), c0,
                      std::min(cols, c0 + kBlock), dst);
    }
  }
}

at::Tensor transposed_blocks(const at::Tensor& src) {
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "transposed_blocks",
                             [&] { out = transposed_blocks_of<scalar_t>(src.contiguous()); });
  return out;
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
                  int64_t positions, int64_t chunk_elems, acc_t* acc, LoadChunk<compute_t> load,
                  Factors<compute_t> factors) {
  const int64_t items = plan.splits * blocks * plan.tiles;
  const int64_t per_split = ceil_div(n, plan.splits);
  gemm_nn_uses_brgemm();  // probe the micro-kernel outside the parallel region
  at::parallel_for(0, items, 1, [&](int64_t first, int64_t last) {
    std::vector<compute_t> chunk(plan.chunk * chunk_elems);
    std::vector<compute_t> scratch(plan.rows * positions);
    const bool fused = positions <= kFusedMaxPositions;
    std::vector<compute_t> prod(fused ? 0 : plan.rows * width);
    // Runs of consecutive tiles of one (split, block).
    for (int64_t item = first; item < last;) {
      const int64_t split = item / (blocks * plan.tiles);
      const int64_t b = item / plan.tiles % blocks, t0 = item % plan.tiles;
      const int64_t t1 = std::min(plan.tiles, t0 + (last - item));
      const int64_t s_end = std::min(n, (split + 1) * per_split);
      for (int64_t c0 = split * per_split; c0 < s_end; c0 += plan.chunk) {
        const int64_t c1 = std::min(s_end, c0 + plan.chunk);
        for (int64_t s = c0; s < c1; ++s) load(s, b, chunk.data() + (s - c0) * chunk_elems);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t r0 = t * plan.rows, r1 = std::min(height, r0 + plan.rows);
          acc_t* acc_tile = acc + ((split * blocks + b) * height + r0) * width;
          for (int64_t s = c0; s < c1; ++s) {
            const auto f =
                factors(s, b, r0, r1, chunk.data() + (s - c0) * chunk_elems, scratch.data());
            if (fused) {
              product_square_add_impl(r1 - r0, width, positions, f.a, positions, f.b, width,
                                      acc_tile);
            } else {
              gemm_nn(r1 - r0, width, positions, f.a, positions, f.b, width, prod.data(), width);
              square_add(prod.data(), acc_tile, (r1 - r0) * width);
            }
          }
        }
      }
      item += t1 - t0;
    }
    gemm_nn_release();
  });
}

#define FF_INSTANTIATE(compute_t, acc_t)                                                   \
  template void tiled_sq_sum<compute_t, acc_t>(const TilePlan&, int64_t, int64_t, int64_t, \
                                               int64_t, int64_t, int64_t, acc_t*,          \
                                               LoadChunk<compute_t>, Factors<compute_t>);  \
  template void square_add<compute_t, acc_t>(const compute_t*, acc_t*, int64_t);
FF_INSTANTIATE(float, float)
FF_INSTANTIATE(float, double)
FF_INSTANTIATE(double, float)
FF_INSTANTIATE(double, double)
#undef FF_INSTANTIATE
template void transpose<float>(const float*, int64_t, int64_t, float*);
template void transpose<double>(const double*, int64_t, int64_t, double*);

}  // namespace fisher_fast
