// Sums of squared per-sample products on the CPU, in cache-sized tiles: the loop shared by the
// convolution kernel (conv2d_sq_sum) and the positions kernel (per_sample_sq_sum).
//
// Each sample s and block b (a convolution group, an independent block of a linear layer) has a
// product P[s,b] = A[s,b] · B[s,b] of A (height × positions) and B (positions × width); the result
// is acc[b] = sum_s P[s,b]², elementwise (height × width per block). The result is cut into tiles
// of rows; for each tile and sample one micro-kernel call (gemm_nn) forms the tile's rows of P in
// a small buffer and their squares are added to the tile, a contiguous block of the result, while
// both are in cache: no per-sample product of the whole layer is ever written to memory. With
// 16 positions or fewer the products are instead summed and squared in registers, blocks of 4 × 16
// entries at a time (measured on this project's layer shapes: 0.73-0.98x the time of the
// micro-kernel and squaring pass there, 1.2-1.6x at 24-48 positions on wide layers).
//
// Work items are (split, block, tile). Each split owns a range of samples and its own
// accumulator; threads take runs of items and walk their samples in chunks, first loading each
// sample's per-chunk operand (a transposed gradient, say) into a buffer, then running their tiles
// over the chunk. Memory: the result per split plus, per thread, one chunk and two tiles,
// whatever N.
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

// acc (plan.splits, blocks, height, width) += the squared products of every sample, as above.
template <typename compute_t, typename acc_t>
void tiled_sq_sum(const TilePlan& plan, int64_t n, int64_t blocks, int64_t height, int64_t width,
                  int64_t positions, int64_t chunk_elems, acc_t* acc, LoadChunk<compute_t> load,
                  Factors<compute_t> factors);

// acc[j] += prod[j]² for j < size.
template <typename compute_t, typename acc_t>
void square_add(const compute_t* prod, acc_t* acc, int64_t size);

// dst (cols × rows) = src (rows × cols)ᵀ, both contiguous, in cache-sized blocks.
template <typename T>
void transpose(const T* src, int64_t rows, int64_t cols, T* dst);

// (blocks, rows, cols) -> (blocks, cols, rows) for a float32 or float64 tensor, contiguous, in
// cache blocks and in parallel: ATen's copy of a transposed view walks one operand a column at a
// time through memory, which cost more than the products themselves for the widest layers.
at::Tensor transposed_blocks(const at::Tensor& src);

}  // namespace fisher_fast
