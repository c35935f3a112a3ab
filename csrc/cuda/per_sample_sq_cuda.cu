// CUDA kernel of fisher_fast::per_sample_sq_sum: out[b] = sum_n (g[n,b]^T x[n,b])^2.
//
// g: (N, B, T, O), x: (N, B, T, I) -> out: (B, O, I) in acc_dtype. The square-and-reduce is fused
// into a tiled matrix product, so no per-sample product ever reaches global memory:
//
//  * a block owns one (b, O-tile, I-tile) of the output and a range of samples;
//  * it walks the rows (n, t) of its samples BK at a time, staging a BK x BM tile of g and one
//    of x in shared memory (converted to the compute type on load, the next step prefetched into
//    registers while the current one is multiplied);
//  * each thread keeps a TM x TM register tile p of the current sample's product and a register
//    tile acc of the sum of squares; when a row closes a sample (t == T - 1), p is squared into
//    acc and reset, so with T = 1 (linear layers) one staged step holds 16 samples.
//
// When O x I is so small that 64 x 64 tiles would be mostly padding (depthwise convolutions have
// O = 1), a direct kernel takes over: one thread per output (b, o, i), reading g and x straight
// from global memory (through L1), with no padding work at all.
//
// When (b, O-tile, I-tile) tiles alone cannot fill the GPU, the samples are also split across
// blocks (grid y); each split writes its own slice of a (splits, B, O, I) buffer and a second
// kernel sums the slices in a fixed order. No atomics: results are deterministic for a given
// device. Products run in float32 for float16, bfloat16 and float32 inputs and in float64 for
// float64 inputs; squares are summed in acc_dtype (float64 squares when either is float64).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "fisher_fast/checks.h"

namespace fisher_fast {
namespace {

// Shape of a block's work: a BM x BM output tile (O x I), TM x TM outputs per thread, rows
// staged BK at a time. Square tiles keep the load mapping shared between g and x.
template <int BM_, int TM_>
struct TileConfig {
  static constexpr int BM = BM_;  // output tile edge (both O and I)
  static constexpr int TM = TM_;  // register tile edge per thread
  static constexpr int BK = 16;   // rows (n, t) staged per step; must fit a 32-bit mask
  static constexpr int kEdgeThreads = BM / TM;
  static constexpr int kThreads = kEdgeThreads * kEdgeThreads;
  static constexpr int kRowsPerLoad = kThreads / BM;  // rows one pass of the block loads
  static constexpr int kLoads = BK / kRowsPerLoad;    // elements of g (and of x) per thread
  static_assert(kThreads % BM == 0 && BK % kRowsPerLoad == 0, "tile does not divide evenly");
};
using Tile = TileConfig<64, 4>;  // 256 threads, 16 outputs each
constexpr int kDirectThreads = 256;

// Position of one staged row (n, t) of a block's samples, advanced BK rows at a time without
// divisions: `row` indexes the (N * B * T) rows of g and x for the block's b.
struct RowCursor {
  int64_t local;  // row index within the block's samples, (n - n_first) * T + t
  int64_t row;    // (n * B + b) * T + t
  int t;
};

// Sum over samples of squared per-sample products for one (b, O-tile, I-tile) and one sample
// split (blockIdx.y); writes out[blockIdx.y] (B, O, I).
template <typename scalar_t, typename compute_t, typename acc_t, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads)
    per_sample_sq_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                         int64_t n_total, int64_t blocks, int t_len, int64_t out_f, int64_t in_f,
                         int64_t o_tiles, int64_t i_tiles, int64_t samples_per_split,
                         acc_t* __restrict__ out) {
  constexpr int BM = Cfg::BM, TM = Cfg::TM, BK = Cfg::BK, kEdge = Cfg::kEdgeThreads;
  // Squares in float64 when either the products or the accumulator are float64.
  using sq_t =
      std::conditional_t<std::is_same_v<compute_t, double> || std::is_same_v<acc_t, double>, double,
                         float>;
  __shared__ compute_t g_tile[BK][BM];
  __shared__ compute_t x_tile[BK][BM];

  const int tid = threadIdx.x;
  // This thread's outputs: rows o0 + ty + i * kEdge, columns i0 + tx + j * kEdge; strided so
  // that a warp reads consecutive shared-memory words (no bank conflicts).
  const int tx = tid % kEdge, ty = tid / kEdge;
  const int64_t i_tile = blockIdx.x % i_tiles;
  const int64_t o_tile = (blockIdx.x / i_tiles) % o_tiles;
  const int64_t b = blockIdx.x / (i_tiles * o_tiles);
  const int64_t o0 = o_tile * BM, i0 = i_tile * BM;
  const int64_t n_first = static_cast<int64_t>(blockIdx.y) * samples_per_split;
  const int64_t rows = (std::min(n_total, n_first + samples_per_split) - n_first) * t_len;

  // Per step every cursor moves BK rows: step_samples whole samples and step_rem positions,
  // plus one sample more when the position wraps past T.
  const int64_t step_samples = BK / t_len;
  const int step_rem = BK % t_len;
  const int64_t sample_rows = blocks * t_len;  // rows between one sample and the next
  const int load_m = tid % BM;                 // column of the tiles this thread loads
  RowCursor cursor[Cfg::kLoads];
#pragma unroll
  for (int l = 0; l < Cfg::kLoads; ++l) {
    const int64_t local = tid / BM + l * Cfg::kRowsPerLoad;
    cursor[l].local = local;
    cursor[l].t = static_cast<int>(local % t_len);
    cursor[l].row = ((n_first + local / t_len) * blocks + b) * t_len + cursor[l].t;
  }
  int t_step = 0;  // t of the first row of the current step (same for every thread)

  // Loads the current step's elements into registers (zero outside the data).
  compute_t g_next[Cfg::kLoads], x_next[Cfg::kLoads];
  const auto load = [&] {
#pragma unroll
    for (int l = 0; l < Cfg::kLoads; ++l) {
      const bool row_ok = cursor[l].local < rows;
      g_next[l] = row_ok && o0 + load_m < out_f
                      ? static_cast<compute_t>(g[cursor[l].row * out_f + o0 + load_m])
                      : compute_t(0);
      x_next[l] = row_ok && i0 + load_m < in_f
                      ? static_cast<compute_t>(x[cursor[l].row * in_f + i0 + load_m])
                      : compute_t(0);
    }
  };

  compute_t p[TM][TM];
  acc_t acc[TM][TM];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int j = 0; j < TM; ++j) {
      p[i][j] = compute_t(0);
      acc[i][j] = acc_t(0);
    }
  }

  load();
  for (int64_t row0 = 0; row0 < rows; row0 += BK) {
#pragma unroll
    for (int l = 0; l < Cfg::kLoads; ++l) {
      g_tile[tid / BM + l * Cfg::kRowsPerLoad][load_m] = g_next[l];
      x_tile[tid / BM + l * Cfg::kRowsPerLoad][load_m] = x_next[l];
    }
    __syncthreads();

    // Bit kk set when staged row kk is the last position (t == T - 1) of a sample.
    uint32_t sample_ends = 0;
    for (int64_t kk = t_len - 1 - t_step; kk < BK && row0 + kk < rows; kk += t_len) {
      sample_ends |= 1u << kk;
    }
    t_step += step_rem;
    if (t_step >= t_len) t_step -= t_len;

    // Prefetch the next step while this one is multiplied.
#pragma unroll
    for (int l = 0; l < Cfg::kLoads; ++l) {
      cursor[l].local += BK;
      cursor[l].t += step_rem;
      cursor[l].row += step_samples * sample_rows + step_rem;
      if (cursor[l].t >= t_len) {
        cursor[l].t -= t_len;
        cursor[l].row += sample_rows - t_len;
      }
    }
    if (row0 + BK < rows) load();

#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      compute_t a[TM], c[TM];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        a[i] = g_tile[kk][ty + i * kEdge];
        c[i] = x_tile[kk][tx + i * kEdge];
      }
#pragma unroll
      for (int i = 0; i < TM; ++i) {
#pragma unroll
        for (int j = 0; j < TM; ++j) p[i][j] += a[i] * c[j];
      }
      if (sample_ends & (1u << kk)) {
#pragma unroll
        for (int i = 0; i < TM; ++i) {
#pragma unroll
          for (int j = 0; j < TM; ++j) {
            const sq_t v = static_cast<sq_t>(p[i][j]);
            acc[i][j] += static_cast<acc_t>(v * v);
            p[i][j] = compute_t(0);
          }
        }
      }
    }
    __syncthreads();
  }

  acc_t* out_b = out + (static_cast<int64_t>(blockIdx.y) * blocks + b) * out_f * in_f;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t o = o0 + ty + i * kEdge;
#pragma unroll
    for (int j = 0; j < TM; ++j) {
      const int64_t in = i0 + tx + j * kEdge;
      if (o < out_f && in < in_f) out_b[o * in_f + in] = acc[i][j];
    }
  }
}

// Small outputs: one thread per output (b, o, i), i fastest, so that a warp's loads of x are
// contiguous and its loads of g are broadcasts; samples split over blockIdx.y as above.
template <typename scalar_t, typename compute_t, typename acc_t>
__global__ void __launch_bounds__(kDirectThreads)
    per_sample_sq_direct_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                int64_t n_total, int64_t blocks, int t_len, int64_t out_f,
                                int64_t in_f, int64_t samples_per_split, acc_t* __restrict__ out) {
  using sq_t =
      std::conditional_t<std::is_same_v<compute_t, double> || std::is_same_v<acc_t, double>, double,
                         float>;
  const int64_t outputs = blocks * out_f * in_f;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= outputs) return;
  const int64_t i = j % in_f, o = (j / in_f) % out_f, b = j / (in_f * out_f);
  const int64_t n_first = static_cast<int64_t>(blockIdx.y) * samples_per_split;
  const int64_t n_last = std::min(n_total, n_first + samples_per_split);
  acc_t acc = acc_t(0);
  for (int64_t n = n_first; n < n_last; ++n) {
    const int64_t row = (n * blocks + b) * t_len;  // row of (n, b, t = 0)
    const scalar_t* g_row = g + row * out_f + o;
    const scalar_t* x_row = x + row * in_f + i;
    compute_t p = compute_t(0);
#pragma unroll 4
    for (int t = 0; t < t_len; ++t) {
      p += static_cast<compute_t>(g_row[t * out_f]) * static_cast<compute_t>(x_row[t * in_f]);
    }
    const sq_t v = static_cast<sq_t>(p);
    acc += static_cast<acc_t>(v * v);
  }
  out[static_cast<int64_t>(blockIdx.y) * outputs + j] = acc;
}

// out[j] = sum over s of partial[s][j], s in increasing order; partial: (splits, size).
template <typename acc_t>
__global__ void sum_splits_kernel(const acc_t* __restrict__ partial, int64_t splits, int64_t size,
                                  acc_t* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < size;
       j += stride) {
    acc_t sum = partial[j];
    for (int64_t s = 1; s < splits; ++s) sum += partial[s * size + j];
    out[j] = sum;
  }
}

// Resident blocks of `kernel` in one wave over the whole device.
template <typename Kernel>
int64_t device_wave(Kernel kernel, int threads) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) *
         std::max(per_sm, 1);
}

// Samples per split: split only when `work_blocks` fill less than one wave, and never into
// splits of fewer than `min_rows` rows (n, t), so that the split overhead stays small.
int64_t samples_per_split(int64_t work_blocks, int64_t wave, int64_t n, int64_t t_len,
                          int64_t min_rows) {
  int64_t splits = 1;
  if (work_blocks < wave) {
    const int64_t max_by_rows = std::max<int64_t>(1, n * t_len / min_rows);
    splits = std::min({(wave + work_blocks - 1) / work_blocks, n, max_by_rows, int64_t{65535}});
  }
  return (n + splits - 1) / splits;
}

// Launches the fused kernel (tiled, or direct for small outputs) and, when the samples were
// split, the reduction of the splits into out. Everything is asynchronous on the current stream.
template <typename scalar_t, typename acc_t>
void launch(const at::Tensor& g, const at::Tensor& x, const at::Tensor& out, bool direct) {
  using compute_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t n = g.size(0), blocks = g.size(1), t_len = g.size(2);
  const int64_t out_f = g.size(3), in_f = x.size(3);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  int64_t per_split = n, splits = 1, wave = 1;
  at::Tensor target = out;  // (splits, B, O, I); out itself when there is one split
  const auto make_target = [&](int64_t work_blocks, int64_t min_rows) {
    per_split = samples_per_split(work_blocks, wave, n, t_len, min_rows);
    splits = (n + per_split - 1) / per_split;  // no empty splits
    if (splits > 1) target = at::empty({splits, blocks, out_f, in_f}, out.options());
  };
  if (direct) {
    const auto kernel = per_sample_sq_direct_kernel<scalar_t, compute_t, acc_t>;
    wave = device_wave(kernel, kDirectThreads);
    const int64_t work_blocks = (out.numel() + kDirectThreads - 1) / kDirectThreads;
    FF_CHECK(work_blocks <= std::numeric_limits<int32_t>::max(), "output too large");
    make_target(work_blocks, 64);
    const dim3 grid(static_cast<unsigned>(work_blocks), static_cast<unsigned>(splits));
    kernel<<<grid, kDirectThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), n, blocks,
        static_cast<int>(t_len), out_f, in_f, per_split, target.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const auto kernel = per_sample_sq_kernel<scalar_t, compute_t, acc_t, Tile>;
    wave = device_wave(kernel, Tile::kThreads);
    const int64_t o_tiles = (out_f + Tile::BM - 1) / Tile::BM;
    const int64_t i_tiles = (in_f + Tile::BM - 1) / Tile::BM;
    const int64_t tiles = blocks * o_tiles * i_tiles;
    FF_CHECK(tiles <= std::numeric_limits<int32_t>::max(), "too many output tiles (", tiles, ")");
    make_target(tiles, 4 * Tile::BK);
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
    kernel<<<grid, Tile::kThreads, 0, stream>>>(g.const_data_ptr<scalar_t>(),
                                                x.const_data_ptr<scalar_t>(), n, blocks,
                                                static_cast<int>(t_len), out_f, in_f, o_tiles,
                                                i_tiles, per_split, target.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (splits > 1) {
    const int64_t size = out.numel();
    const int threads = 256;
    const int64_t grid_sum = std::min<int64_t>((size + threads - 1) / threads, wave * 8);
    sum_splits_kernel<acc_t><<<static_cast<unsigned>(grid_sum), threads, 0, stream>>>(
        target.const_data_ptr<acc_t>(), splits, size, out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor per_sample_sq_sum_cuda(const at::Tensor& g_in, const at::Tensor& x_in,
                                  at::ScalarType acc_dtype) {
  FF_CHECK(g_in.dim() == 4 && x_in.dim() == 4,
           "g and x must be 4-D (N, B, T, O) and (N, B, T, I); got ", g_in.sizes(), " and ",
           x_in.sizes());
  FF_CHECK(
      g_in.size(0) == x_in.size(0) && g_in.size(1) == x_in.size(1) && g_in.size(2) == x_in.size(2),
      "g ", g_in.sizes(), " and x ", x_in.sizes(), " must agree in samples, blocks and positions");
  FF_CHECK_FLOATING(g_in, "g");
  FF_CHECK(g_in.scalar_type() == x_in.scalar_type(), "g and x must share one dtype");
  FF_CHECK(acc_dtype == at::kFloat || acc_dtype == at::kDouble,
           "acc_dtype must be float32 or float64, got ", acc_dtype);
  FF_CHECK_SAME_DEVICE(g_in, x_in, "g", "x");
  FF_CHECK(g_in.device().is_cuda(), "expected CUDA tensors, got ", g_in.device());
  FF_CHECK(g_in.size(2) <= std::numeric_limits<int32_t>::max(), "too many positions T (",
           g_in.size(2), ")");

  const c10::cuda::CUDAGuard guard(g_in.device());
  const int64_t blocks = g_in.size(1), out_f = g_in.size(3), in_f = x_in.size(3);
  // No rows (N = 0 or T = 0): every per-sample product is zero.
  if (g_in.size(0) == 0 || g_in.size(2) == 0) {
    return at::zeros({blocks, out_f, in_f}, g_in.options().dtype(acc_dtype));
  }
  auto out = at::empty({blocks, out_f, in_f}, g_in.options().dtype(acc_dtype));
  if (out.numel() == 0) return out;
  const auto g = g_in.contiguous(), x = x_in.contiguous();

  // Tiles unless padding O and I to multiples of 64 would multiply the work by more than 8
  // (about the direct kernel's cost per multiply-add relative to the tiled one's).
  const auto padded = [](int64_t v) { return (v + Tile::BM - 1) / Tile::BM * Tile::BM; };
  const bool direct = padded(out_f) * padded(in_f) > 8 * out_f * in_f;

  const auto dtype = g.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "per_sample_sq_cuda", [&] {
    if (acc_dtype == at::kDouble) {
      launch<scalar_t, double>(g, x, out, direct);
    } else {
      launch<scalar_t, float>(g, x, out, direct);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fisher_fast, CUDA, m) { m.impl("per_sample_sq_sum", &per_sample_sq_sum_cuda); }

}  // namespace fisher_fast
