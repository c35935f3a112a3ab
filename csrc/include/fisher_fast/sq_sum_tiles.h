// Sums of squared per-sample products on the CPU, in cache-sized tiles: the loop shared by the
// convolution kernel (conv2d_sq_sum) and the positions kernel (per_sample_sq_sum).
//
// Each sample s and block b (a convolution group, an independent block of a linear layer) has a
// product P[s,b] = A[s,b] · B[s,b] of A (height × positions) and B (positions × width); the result
// is out[b] = sum_s P[s,b]², elementwise (height × width per block, or its transpose). The result
// is cut into tiles of rows, and each tile is summed over every sample in a buffer that stays in
// cache before it is written out (transposed, if asked): no per-sample product of the whole layer
// is ever written to memory, and the result is written once. With more than 16 positions, one
// micro-kernel call (gemm_nn) per tile and sample forms the tile's rows of P in a small buffer
// and their squares are added while both are in cache. With 16 or fewer, the products of a
// group of up to 16 samples are formed in registers, blocks of 4 rows × 32 float32 (16 float64)
// columns, and their squares summed there too.
//
// Work items are (split, block, tile). Each split owns a range of samples and its own copy of the
// result; threads take runs of items and walk their samples in chunks, first loading each
// sample's per-chunk operand (a transposed gradient, say) into a buffer (once per run of tiles
// when one chunk holds the split's samples), then building each sample's factors for the tile.
// Memory: the result per split plus, per thread, one chunk, a group's scratch factors and a tile
// or two, whatever N.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/FunctionRef.h>

#include <cstdint>

namespace fisher_fast {

int64_t ceil_div(int64_t a, int64_t b);

// How the (splits × blocks × tiles) work is cut.
struct TilePlan {
  int64_t rows;    // result rows per tile
  int64_t tiles;   // tiles per block
  int64_t splits;  // sample ranges, each with its own accumulator
  int64_t chunk;   // samples whose per-chunk operands a thread holds at once
};

// A plan for n samples of `blocks` products (height × positions) · (positions × width), whose
// per-chunk operand takes chunk_elems elements per sample, in elements of elem bytes.
TilePlan plan_tiles(int64_t n, int64_t blocks, int64_t height, int64_t width, int64_t positions,
                    int64_t chunk_elems, int64_t elem, int64_t threads);

// The two factors of one tile's product: a (rows × positions, row stride positions) and b
// (positions × width, row stride width).
template <typename T>
struct TileFactors {
  const T* a;
  const T* b;
};

// Writes sample s, block b's per-chunk operand (chunk_elems elements) to the buffer.
template <typename T>
using LoadChunk = c10::function_ref<void(int64_t s, int64_t b, T* chunk)>;

// The factors of rows [r0, r1) of sample s, block b's product, given that sample's loaded chunk
// operand and a scratch buffer of rows × positions elements for a factor built on the fly.
template <typename T>
using Factors = c10::function_ref<TileFactors<T>(int64_t s, int64_t b, int64_t r0, int64_t r1,
                                                 const T* chunk, T* scratch)>;

// What is taken off each product before it is squared: P[s,b] - 1 shift[s,b]ᵀ - basis[b] ⊙
// (1 scale[s,b]ᵀ), that is, per column j a constant shift[s,b,j] and scale[s,b,j] times the
// column of a basis shared by the samples. shift and scale: (n, blocks, width) contiguous;
// basis: (blocks, width, height) contiguous, each block transposed against the products (the
// result's layout with `transposed`); the loop transposes it a tile at a time.
template <typename T>
struct Correction {
  const T* shift;
  const T* scale;
  const T* basis;
};

// out (blocks × height × width elements, contiguous, of acc_t) = the sums over all samples of
// their squared products, as above, each block stored (height, width), or (width, height) with
// `transposed`; += with `accumulate`. Every element of out is written. With a correction, the
// products are corrected (as above) before they are squared.
template <typename compute_t, typename acc_t>
void tiled_sq_sum(const TilePlan& plan, int64_t n, int64_t blocks, int64_t height, int64_t width,
                  int64_t positions, int64_t chunk_elems, at::Tensor& out, bool transposed,
                  bool accumulate, LoadChunk<compute_t> load, Factors<compute_t> factors,
                  const Correction<compute_t>* correction = nullptr);

// acc[j] += prod[j]² for j < size.
template <typename compute_t, typename acc_t>
void square_add(const compute_t* prod, acc_t* acc, int64_t size);

// dst (cols × rows) = src (rows × cols)ᵀ, both contiguous, in cache-sized blocks.
template <typename T>
void transpose(const T* src, int64_t rows, int64_t cols, T* dst);

}  // namespace fisher_fast
