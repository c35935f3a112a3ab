// CUDA kernel of fisher_fast::frechet_sums: one reference diagonal FIM against K others.
//
// Same result as the CPU kernel (csrc/cpu/frechet_cpu.cpp), a (K, 5) float64 tensor, computed in
// two deterministic stages on the current stream, with no atomics and no host synchronisation:
//
//  1. frechet_partials_kernel: a grid-stride walk over every segment (tensor) of the FIMs. Each
//     thread reads a reference element once and combines it with up to kMaxOthers others, keeping
//     float64 sums in registers; each block reduces its threads' sums (warp shuffles, then one warp
//     over the warps' results) into one row of a (passes, blocks, slots) partials buffer.
//  2. frechet_finalize_kernel: one block per output cell sums that cell's partials over the blocks
//     in a fixed order and writes it to the result.
//
// The segment table (element count, alignment flag and data pointers of each segment) goes to the
// device through a pinned buffer and an asynchronous copy, so P tensors cost one kernel launch,
// not P. More than kMaxOthers others are handled in passes of kMaxOthers, each rereading the
// reference (a pass per 8 others, so the reference traffic grows by at most 1/8 per other).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "fisher_fast/checks.h"
#include "fisher_fast/frechet_checks.h"
#include "fisher_fast/frechet_math.h"

namespace fisher_fast {
namespace {

constexpr int kThreads = 256;   // threads per block of both kernels
constexpr int kMaxOthers = 8;   // others combined with one read of the reference
constexpr int kTableFixed = 3;  // table row: numel, aligned flag, ref pointer, then K pointers
constexpr int kVecBytes = 16;   // width of the vectorised loads

// Slots of a thread's (and a block's) partial sums for KMAX others:
// [sum ref, invalid ref, then (sum other, cross, invalid other) per other].
template <int KMAX>
struct Slots {
  static constexpr int kCount = 2 + 3 * KMAX;
};

// Value of one FIM entry in float64, rounded through float32 first for the narrower types,
// exactly as the CPU kernel does.
template <typename T>
__device__ __forceinline__ double load_value(T v) {
  return static_cast<double>(static_cast<float>(v));
}
template <>
__device__ __forceinline__ double load_value<double>(double v) {
  return v;
}

// V consecutive elements read with one load; only used on 16-byte aligned addresses.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Adds the contribution of elements [i, i + V) of one segment to a thread's sums.
template <typename T, int V, int KMAX>
__device__ __forceinline__ void accumulate(const T* ref, const T* const* others, int k_count,
                                           int64_t i, double* acc) {
  const Pack<T, V> r = *reinterpret_cast<const Pack<T, V>*>(ref + i);
  double a[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    a[v] = load_value(r.v[v]);
    acc[0] += a[v];
    acc[1] += invalid_entry(a[v]);
  }
#pragma unroll
  for (int k = 0; k < KMAX; ++k) {
    if (k < k_count) {
      const Pack<T, V> o = *reinterpret_cast<const Pack<T, V>*>(others[k] + i);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const double b = load_value(o.v[v]);
        acc[2 + 3 * k] += b;
        acc[3 + 3 * k] += sqrt_product(a[v], b);
        acc[4 + 3 * k] += invalid_entry(b);
      }
    }
  }
}

// Sum of `value` over the block, in a fixed order; the result is valid in thread 0.
// `scratch` holds one double per warp.
__device__ __forceinline__ double block_sum(double value, double* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  __syncthreads();  // scratch may still be read by the previous call
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < blockDim.x / 32 ? scratch[lane] : 0.0;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      value += __shfl_down_sync(0xffffffffu, value, offset);
    }
  }
  return value;
}

// Stage 1. table: (n_seg, width) int64 rows [numel, aligned, ref, other_0 .. other_{K-1}];
// this pass combines others [k_first, k_first + k_count), k_count <= KMAX.
// partials: (gridDim.x, Slots<KMAX>::kCount) float64, one row per block.
template <typename T, int KMAX>
__global__ void __launch_bounds__(kThreads)
    frechet_partials_kernel(const int64_t* __restrict__ table, int64_t n_seg, int width,
                            int k_first, int k_count, double* __restrict__ partials) {
  constexpr int kSlots = Slots<KMAX>::kCount;
  constexpr int kVec = kVecBytes / sizeof(T);
  double acc[kSlots];
#pragma unroll
  for (int j = 0; j < kSlots; ++j) acc[j] = 0.0;

  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t s = 0; s < n_seg; ++s) {
    const int64_t* row = table + s * width;
    const int64_t numel = row[0];
    const bool aligned = row[1] != 0;
    const T* ref = reinterpret_cast<const T*>(row[2]);
    const T* others[KMAX];
#pragma unroll
    for (int k = 0; k < KMAX; ++k) {
      others[k] = k < k_count ? reinterpret_cast<const T*>(row[kTableFixed + k_first + k]) : ref;
    }
    int64_t tail = 0;  // first element left to the scalar loop
    if (aligned) {
      const int64_t packs = numel / kVec;
      for (int64_t p = first; p < packs; p += stride) {
        accumulate<T, kVec, KMAX>(ref, others, k_count, p * kVec, acc);
      }
      tail = packs * kVec;
    }
    for (int64_t i = tail + first; i < numel; i += stride) {
      accumulate<T, 1, KMAX>(ref, others, k_count, i, acc);
    }
  }

  __shared__ double scratch[kThreads / 32];
#pragma unroll
  for (int j = 0; j < kSlots; ++j) {
    const double total = block_sum(acc[j], scratch);
    if (threadIdx.x == 0) partials[static_cast<int64_t>(blockIdx.x) * kSlots + j] = total;
  }
}

// Stage 2. partials: (passes, n_blocks, slots) from stage 1, pass p holding others
// [p * kmax, (p + 1) * kmax). One block per cell of out (k_count, kFrechetColumns).
__global__ void __launch_bounds__(kThreads)
    frechet_finalize_kernel(const double* __restrict__ partials, int n_blocks, int slots, int kmax,
                            double* __restrict__ out) {
  const int k = blockIdx.x / kFrechetColumns, column = blockIdx.x % kFrechetColumns;
  // The reference's sums are the same in every pass: take them from the first.
  int pass = 0, slot = column == kSumRef ? 0 : 1;
  if (column != kSumRef && column != kInvalidRef) {
    const int offset = column == kSumOther ? 0 : (column == kCross ? 1 : 2);
    pass = k / kmax;
    slot = 2 + 3 * (k % kmax) + offset;
  }
  const double* base = partials + static_cast<int64_t>(pass) * n_blocks * slots + slot;
  double sum = 0.0;
  for (int b = threadIdx.x; b < n_blocks; b += blockDim.x)
    sum += base[static_cast<int64_t>(b) * slots];
  __shared__ double scratch[kThreads / 32];
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = sum;
}

// Launches stage 1 for every pass and stage 2; everything is asynchronous on `stream`.
template <typename T, int KMAX>
void launch(const at::Tensor& table, int64_t n_seg, int width, int64_t k_count, int64_t max_numel,
            const at::Tensor& out, cudaStream_t stream) {
  constexpr int kSlots = Slots<KMAX>::kCount;
  constexpr int kVec = kVecBytes / sizeof(T);
  // One full wave of resident blocks, fewer when the largest segment cannot use them.
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, frechet_partials_kernel<T, KMAX>, kThreads, 0));
  const int64_t wave =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) *
      std::max(per_sm, 1);
  const int64_t needed = (max_numel + int64_t{kThreads} * kVec - 1) / (int64_t{kThreads} * kVec);
  const int n_blocks = static_cast<int>(std::max<int64_t>(1, std::min(wave, needed)));

  const int64_t passes = (k_count + KMAX - 1) / KMAX;
  auto partials = at::empty({passes, n_blocks, kSlots}, out.options());
  for (int64_t p = 0; p < passes; ++p) {
    const int k_first = static_cast<int>(p * KMAX);
    const int k_this = static_cast<int>(std::min<int64_t>(KMAX, k_count - k_first));
    frechet_partials_kernel<T, KMAX><<<n_blocks, kThreads, 0, stream>>>(
        table.data_ptr<int64_t>(), n_seg, width, k_first, k_this,
        partials.data_ptr<double>() + p * n_blocks * kSlots);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  frechet_finalize_kernel<<<static_cast<unsigned>(k_count * kFrechetColumns), kThreads, 0,
                            stream>>>(partials.data_ptr<double>(), n_blocks, kSlots, KMAX,
                                      out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor frechet_sums_cuda(at::TensorList ref, at::TensorList others) {
  const int64_t n_seg = static_cast<int64_t>(ref.size());
  check_frechet_inputs(ref, others, c10::DeviceType::CUDA);
  const int64_t k_count = static_cast<int64_t>(others.size()) / n_seg;
  const auto dtype = ref[0].scalar_type();

  const c10::cuda::CUDAGuard guard(ref[0].device());
  auto out = at::empty({k_count, kFrechetColumns}, ref[0].options().dtype(at::kDouble));
  if (k_count == 0) return out;

  // Segment table, filled on the host in pinned memory and copied asynchronously; the caching
  // host allocator keeps the pinned block alive until the copy has run.
  const int width = kTableFixed + static_cast<int>(k_count);
  auto host_table =
      at::empty({n_seg, width}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* row = host_table.data_ptr<int64_t>();
  int64_t max_numel = 0;
  for (int64_t s = 0; s < n_seg; ++s, row += width) {
    const auto address = [](const at::Tensor& t) {
      return reinterpret_cast<int64_t>(t.const_data_ptr());
    };
    bool aligned = address(ref[s]) % kVecBytes == 0;
    row[0] = ref[s].numel();
    row[2] = address(ref[s]);
    for (int64_t k = 0; k < k_count; ++k) {
      row[kTableFixed + k] = address(others[k * n_seg + s]);
      aligned = aligned && row[kTableFixed + k] % kVecBytes == 0;
    }
    row[1] = aligned ? 1 : 0;
    max_numel = std::max(max_numel, row[0]);
  }
  const auto table = host_table.to(out.device(), /*non_blocking=*/true);

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "frechet_sums_cuda", [&] {
    // The smallest register footprint that still reads the reference once for all others.
    if (k_count == 1) {
      launch<scalar_t, 1>(table, n_seg, width, k_count, max_numel, out, stream);
    } else if (k_count == 2) {
      launch<scalar_t, 2>(table, n_seg, width, k_count, max_numel, out, stream);
    } else if (k_count <= 4) {
      launch<scalar_t, 4>(table, n_seg, width, k_count, max_numel, out, stream);
    } else {
      launch<scalar_t, kMaxOthers>(table, n_seg, width, k_count, max_numel, out, stream);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fisher_fast, CUDA, m) { m.impl("frechet_sums", &frechet_sums_cuda); }

}  // namespace fisher_fast
