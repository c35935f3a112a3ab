// CPU kernel of fisher_fast::conv2d_sq_sum: out[b] = sum_n (G[n,b] U[n,b]ᵀ)^2, the squared
// per-sample weight gradients of a 2-D convolution, without an im2col tensor of the batch.
//
// The result is summed in tiles of (I/groups) × (O/groups), I = C * kernel_h * kernel_w, by the
// tiled loop of sq_sum_tiles.h, and written transposed into (groups, O/groups, I/groups): per
// sample, the output gradient G[n,b] (O_g × L) is transposed once into L × O_g (the chunk
// operand), and each tile of patch rows U (rows × L) is either read from the input (a 1×1
// convolution without stride or padding) or written into a small buffer (patch_rows), then
// multiplied by it and squared in cache.
//
// conv2d_residual_sq_sum_ squares, in place of each per-sample gradient, its residual after a
// shift per output channel and a multiple of a basis row per output channel are taken off
// (Correction in sq_sum_tiles.h): the per-sample gradients of a weight-standardised convolution,
// a projection of the convolution's, with no pass over the batch beyond the convolution's own.
//
// Depthwise convolutions (one input and one output channel per group) take a direct path
// instead: per channel and sample, the input is copied once into a zero-padded buffer and each
// of the k² weight entries' gradients is one strided dot product with the output gradient, so
// no patch row is built and no micro-kernel is called for a product of k² × L × 1 (both cost
// more than the product itself at the small spatial sizes of late layers).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "fisher_fast/checks.h"
#include "fisher_fast/conv_patches.h"
#include "fisher_fast/sq_sum_tiles.h"

namespace fisher_fast {
namespace {

// Output size along one axis of a convolution with `pad` zeros before an input of `size` and
// `after` zeros past its end, 0 when the kernel's reach exceeds the padded input. The caller
// checks that size + pad + after fits int64.
int64_t conv_out_size(int64_t size, int64_t pad, int64_t after, int64_t reach, int64_t stride) {
  const int64_t span = size + pad + after;
  return span < reach ? 0 : (span - reach) / stride + 1;
}

// Checks one spatial axis (0: height, 1: width) of the geometry against g's size along it.
void check_axis(int d, int64_t size, int64_t out, int64_t kernel, int64_t stride, int64_t pad,
                int64_t dilation) {
  const char* axis = d == 0 ? "height" : "width";
  FF_CHECK(kernel >= 1, "kernel_size[", d, "] is ", kernel,
           "; kernel_size, stride and dilation must be positive and padding nonnegative");
  FF_CHECK(stride >= 1, "stride[", d, "] is ", stride,
           "; kernel_size, stride and dilation must be positive and padding nonnegative");
  FF_CHECK(dilation >= 1, "dilation[", d, "] is ", dilation,
           "; kernel_size, stride and dilation must be positive and padding nonnegative");
  FF_CHECK(pad >= 0, "padding[", d, "] is ", pad,
           "; kernel_size, stride and dilation must be positive and padding nonnegative");
  // The kernel's reach dilation * (kernel - 1) + 1. The zeros after the input are implied by g:
  // as many as before it (symmetric padding), or one more ('same' padding of an odd reach - 1).
  const int64_t reach =
      checked_add(checked_mul(dilation, kernel - 1, "dilation * (kernel_size - 1)"), 1,
                  "the kernel's reach dilation * (kernel_size - 1) + 1");
  checked_add(checked_add(checked_add(size, pad, "input size + padding"), pad,
                          "input size + padding on both sides"),
              1, "input size + padding on both sides + 1");
  const int64_t lo = conv_out_size(size, pad, pad, reach, stride);
  const int64_t hi = conv_out_size(size, pad, pad + 1, reach, stride);
  FF_CHECK(out >= lo && out <= hi, "g has output ", axis, " ", out, ", but x's ", axis, " ", size,
           " with kernel_size[", d, "] = ", kernel, ", stride[", d, "] = ", stride, ", padding[", d,
           "] = ", pad, " and dilation[", d, "] = ", dilation, " gives an output ", axis, " from ",
           lo, " to ", hi, " (padding[", d,
           "] zeros before the input, and as many or one more after it); pass the gradient of "
           "this convolution's output, or fix kernel_size, stride, padding and dilation");
}

ConvGeometry geometry(const at::Tensor& x, const at::Tensor& g, at::IntArrayRef kernel,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  return {x.size(2), x.size(3), g.size(2),  g.size(3),  kernel[0],   kernel[1],
          stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]};
}

void check_inputs(const at::Tensor& x, const at::Tensor& g, at::IntArrayRef kernel,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                  int64_t groups, at::ScalarType acc_dtype) {
  FF_CHECK(x.dim() == 4 && g.dim() == 4,
           "x and g must be 4-D (N, C, H, W) and (N, O, Ho, Wo); got ", x.sizes(), " and ",
           g.sizes());
  FF_CHECK(x.size(0) == g.size(0), "x ", x.sizes(), " and g ", g.sizes(),
           " must have the same number of samples");
  FF_CHECK_FLOATING(x, "x");
  FF_CHECK(x.scalar_type() == g.scalar_type(), "x and g must share one dtype");
  FF_CHECK_SAME_DEVICE(x, g, "x", "g");
  FF_CHECK(x.device().is_cpu(), "conv2d_sq_sum runs on CPU tensors only");
  FF_CHECK(acc_dtype == at::kFloat || acc_dtype == at::kDouble,
           "acc_dtype must be float32 or float64, got ", acc_dtype);
  FF_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
           "kernel_size, stride, padding and dilation must have two entries each");
  FF_CHECK(groups >= 1 && x.size(1) % groups == 0 && g.size(1) % groups == 0, "groups (", groups,
           ") must divide the input channels (", x.size(1), ") and output channels (", g.size(1),
           ")");
  for (int d = 0; d < 2; ++d) {
    check_axis(d, x.size(2 + d), g.size(2 + d), kernel[d], stride[d], padding[d], dilation[d]);
  }
  // The result (groups, O/groups, C/groups * kh * kw) and its bytes, per split accumulator.
  const int64_t columns = checked_mul(
      x.size(1) / groups, checked_mul(kernel[0], kernel[1], "kernel_size[0] * kernel_size[1]"),
      "the weight columns C/groups * kernel_size[0] * kernel_size[1]");
  checked_mul(checked_mul(g.size(1), columns, "the result's size"), at::elementSize(at::kDouble),
              "the result's size in bytes");
}

// Zero-padded input size along one axis that every window of the `out` outputs fits in.
int64_t padded_size(int64_t out, int64_t stride, int64_t kernel, int64_t dilation) {
  return (out - 1) * stride + (kernel - 1) * dilation + 1;
}

// The direct path applies when every group has one input and one output channel and the padded
// buffer stays near the input's size (padding far past the input goes the general way).
bool use_depthwise(const ConvGeometry& geo, int64_t channels, int64_t out_ch, int64_t groups) {
  if (channels != groups || out_ch != groups) return false;
  const int64_t hp = padded_size(geo.out_height, geo.stride_h, geo.kernel_h, geo.dilation_h);
  const int64_t wp = padded_size(geo.out_width, geo.stride_w, geo.kernel_w, geo.dilation_w);
  const int64_t limit = 4 * (geo.height + 2) * (geo.width + 2) + 4096;
  return hp <= limit && wp <= limit && hp * wp <= limit;
}

// out[c, i * kw + j] = sum_n (sum_{oh, ow} g[n, c, oh, ow] x[n, c, oh sh - ph + i dh,
// ow sw - pw + j dw])².
//
// Channels go in blocks of kLanes, threads own blocks (and their rows of the result). Per sample,
// the block's input is copied into a zero-padded buffer with the channel innermost, and its
// gradient likewise, so that every multiply-add runs across kLanes channels at once: the
// spatial loops are often shorter than a vector (a 7×7 kernel on 4×4 outputs).
constexpr int64_t kLanes = 16;

template <typename compute_t, typename acc_t>
void depthwise_sq_sum(const compute_t* x, const compute_t* g, const ConvGeometry& geo, int64_t n,
                      int64_t channels, acc_t* out, bool accumulate) {
  const int64_t hp = padded_size(geo.out_height, geo.stride_h, geo.kernel_h, geo.dilation_h);
  const int64_t wp = padded_size(geo.out_width, geo.stride_w, geo.kernel_w, geo.dilation_w);
  const int64_t image = geo.height * geo.width, positions = geo.positions();
  const int64_t taps = geo.kernel_size();
  // Input rows and columns inside the buffer: [pad, pad + size) clipped to it.
  const int64_t rows = std::max<int64_t>(0, std::min(geo.height, hp - geo.pad_h));
  const int64_t cols = std::max<int64_t>(0, std::min(geo.width, wp - geo.pad_w));
  const int64_t blocks = ceil_div(channels, kLanes);
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    std::vector<compute_t> padded(hp * wp * kLanes, compute_t(0));
    std::vector<compute_t> grads(positions * kLanes, compute_t(0));
    std::vector<compute_t> prod(taps * kLanes);
    std::vector<acc_t> acc(taps * kLanes);
    for (int64_t block = first; block < last; ++block) {
      const int64_t c0 = block * kLanes, lanes = std::min(kLanes, channels - c0);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t s = 0; s < n; ++s) {
        // Lanes past the last channel hold stale values; their sums are never written out.
        // Written a pixel (kLanes channels) at a time, read from kLanes sequential streams.
        const compute_t* xs = x + (s * channels + c0) * image;
        const compute_t* gs = g + (s * channels + c0) * positions;
        for (int64_t r = 0; r < rows; ++r) {
          compute_t* dst = padded.data() + ((r + geo.pad_h) * wp + geo.pad_w) * kLanes;
          for (int64_t w = 0; w < cols; ++w) {
            for (int64_t l = 0; l < lanes; ++l)
              dst[w * kLanes + l] = xs[l * image + r * geo.width + w];
          }
        }
        for (int64_t p = 0; p < positions; ++p) {
          for (int64_t l = 0; l < lanes; ++l) grads[p * kLanes + l] = gs[l * positions + p];
        }
        for (int64_t i = 0; i < geo.kernel_h; ++i) {
          for (int64_t j = 0; j < geo.kernel_w; ++j) {
            compute_t sum[kLanes] = {};  // in registers across the positions
            for (int64_t oh = 0; oh < geo.out_height; ++oh) {
              const int64_t y = oh * geo.stride_h + i * geo.dilation_h;
              for (int64_t ow = 0; ow < geo.out_width; ++ow) {
                const compute_t* xv =
                    padded.data() + (y * wp + ow * geo.stride_w + j * geo.dilation_w) * kLanes;
                const compute_t* gv = grads.data() + (oh * geo.out_width + ow) * kLanes;
#pragma omp simd
                for (int64_t l = 0; l < kLanes; ++l) sum[l] += gv[l] * xv[l];
              }
            }
            std::copy(sum, sum + kLanes, prod.data() + (i * geo.kernel_w + j) * kLanes);
          }
        }
        square_add(prod.data(), acc.data(), taps * kLanes);
      }
      for (int64_t l = 0; l < lanes; ++l) {
        for (int64_t t = 0; t < taps; ++t) {
          acc_t& dst = out[(c0 + l) * taps + t];
          dst = (accumulate ? dst : acc_t(0)) + acc[t * kLanes + l];
        }
      }
    }
  });
}

// The residuals' terms of conv2d_residual_sq_sum_: shift and scale (N, O), basis O * I_g elements
// in the weight's order.
struct Residual {
  const at::Tensor& shift;
  const at::Tensor& scale;
  const at::Tensor& basis;
};

// out (groups, O_g, I_g elements, contiguous, float32 or float64) = the sums, or += with
// `accumulate`, for checked inputs; of the residuals' squares when `residual` is given.
void conv2d_sq_sum_into(at::Tensor& out, bool accumulate, const at::Tensor& x, const at::Tensor& g,
                        const ConvGeometry& geo, int64_t groups,
                        const Residual* residual = nullptr) {
  const int64_t n = x.size(0), channels = x.size(1), out_ch = g.size(1);
  const int64_t out_g = out_ch / groups, in_g = channels / groups * geo.kernel_size();
  const int64_t positions = geo.positions(), image = geo.height * geo.width;
  // Empty dimensions: the sums are zeros (or empty), and the planning needs at least one weight
  // column, one output channel, one sample and one position.
  if (n == 0 || positions == 0 || in_g == 0 || out_g == 0) {
    if (!accumulate) out.zero_();
    return;
  }
  const auto acc_dtype = out.scalar_type();
  // Products run in float32 for reduced-precision inputs and in float64 for float64 inputs.
  const auto compute = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto xc = x.to(compute).contiguous();
  const auto gc = g.to(compute).contiguous();
  if (residual == nullptr && use_depthwise(geo, channels, out_ch, groups)) {
    AT_DISPATCH_FLOATING_TYPES(compute, "conv2d_sq_sum_cpu_depthwise", [&] {
      using compute_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(acc_dtype, "conv2d_sq_sum_cpu_depthwise_acc", [&] {
        depthwise_sq_sum(xc.data_ptr<compute_t>(), gc.data_ptr<compute_t>(), geo, n, channels,
                         out.data_ptr<scalar_t>(), accumulate);
      });
    });
    return;
  }
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk_elems = positions * out_g;  // a sample's transposed gradient (L × O_g)
  const TilePlan plan =
      plan_tiles(n, groups, in_g, out_g, positions, chunk_elems, at::elementSize(compute), threads);
  const bool direct = geo.patches_are_input();
  // In the layouts of Correction: the weight's order is the result's, (groups, O_g, I_g); the
  // shifts and scales are (N, groups, O_g).
  at::Tensor shift, scale, basis;
  if (residual != nullptr) {
    shift = residual->shift.to(compute).contiguous();
    scale = residual->scale.to(compute).contiguous();
    basis = residual->basis.to(compute).contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES(compute, "conv2d_sq_sum_cpu_compute", [&] {
    using compute_t = scalar_t;
    const compute_t* x_data = xc.data_ptr<compute_t>();
    const compute_t* g_data = gc.data_ptr<compute_t>();
    const auto load = [&](int64_t s, int64_t b, compute_t* chunk) {
      transpose(g_data + (s * out_ch + b * out_g) * positions, out_g, positions, chunk);
    };
    // Patch rows (rows × L) of the sample's group times its transposed gradient (L × O_g).
    const auto factors = [&](int64_t s, int64_t b, int64_t r0, int64_t r1, const compute_t* chunk,
                             compute_t* scratch) {
      const compute_t* x_group = x_data + (s * channels + b * (channels / groups)) * image;
      if (direct) return TileFactors<compute_t>{x_group + r0 * positions, chunk};
      patch_rows(x_group, geo, r0, r1, scratch);
      return TileFactors<compute_t>{scratch, chunk};
    };
    const Correction<compute_t> correction{
        residual == nullptr ? nullptr : shift.data_ptr<compute_t>(),
        residual == nullptr ? nullptr : scale.data_ptr<compute_t>(),
        residual == nullptr ? nullptr : basis.data_ptr<compute_t>()};
    AT_DISPATCH_FLOATING_TYPES(acc_dtype, "conv2d_sq_sum_cpu_acc", [&] {
      tiled_sq_sum<compute_t, scalar_t>(plan, n, groups, in_g, out_g, positions, chunk_elems, out,
                                        /*transposed=*/true, accumulate, load, factors,
                                        residual == nullptr ? nullptr : &correction);
    });
  });
}

at::Tensor conv2d_sq_sum_cpu(const at::Tensor& x, const at::Tensor& g, at::IntArrayRef kernel,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups, at::ScalarType acc_dtype) {
  check_inputs(x, g, kernel, stride, padding, dilation, groups, acc_dtype);
  const ConvGeometry geo = geometry(x, g, kernel, stride, padding, dilation);
  const int64_t out_g = g.size(1) / groups, in_g = x.size(1) / groups * geo.kernel_size();
  auto out = at::empty({groups, out_g, in_g}, x.options().dtype(acc_dtype));
  conv2d_sq_sum_into(out, /*accumulate=*/false, x, g, geo, groups);
  return out;
}

// The geometry of an in-place op's checked inputs, acc a running total shaped like the weight.
ConvGeometry checked_accumulation(const at::Tensor& acc, const at::Tensor& x, const at::Tensor& g,
                                  at::IntArrayRef kernel, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups) {
  FF_CHECK_ACCUMULATOR(acc);
  check_inputs(x, g, kernel, stride, padding, dilation, groups, acc.scalar_type());
  const ConvGeometry geo = geometry(x, g, kernel, stride, padding, dilation);
  const int64_t out_g = g.size(1) / groups, in_g = x.size(1) / groups * geo.kernel_size();
  FF_CHECK_SAME_DEVICE(acc, x, "acc", "x");
  FF_CHECK(acc.numel() == groups * out_g * in_g, "acc has ", acc.numel(),
           " elements but the weight of this convolution has ", groups * out_g * in_g,
           " (O = ", g.size(1), " times C/groups * kernel_h * kernel_w = ", in_g,
           "); pass an accumulator shaped like the weight");
  return geo;
}

void conv2d_sq_sum_inplace_cpu(at::Tensor& acc, const at::Tensor& x, const at::Tensor& g,
                               at::IntArrayRef kernel, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvGeometry geo =
      checked_accumulation(acc, x, g, kernel, stride, padding, dilation, groups);
  conv2d_sq_sum_into(acc, /*accumulate=*/true, x, g, geo, groups);
}

// A per-(sample, output channel) term of the residuals: (N, O), floating, on x's device.
void check_residual_term(const at::Tensor& t, const char* name, const at::Tensor& x,
                         const at::Tensor& g) {
  FF_CHECK_FLOATING(t, name);
  FF_CHECK_SAME_DEVICE(t, x, name, "x");
  FF_CHECK(t.dim() == 2 && t.size(0) == g.size(0) && t.size(1) == g.size(1), name, " has shape ",
           t.sizes(), " but g ", g.sizes(), " needs (N, O) = (", g.size(0), ", ", g.size(1),
           "): one value per sample and output channel");
}

void conv2d_residual_sq_sum_inplace_cpu(at::Tensor& acc, const at::Tensor& x, const at::Tensor& g,
                                        const at::Tensor& shift, const at::Tensor& scale,
                                        const at::Tensor& basis, at::IntArrayRef kernel,
                                        at::IntArrayRef stride, at::IntArrayRef padding,
                                        at::IntArrayRef dilation, int64_t groups) {
  const ConvGeometry geo =
      checked_accumulation(acc, x, g, kernel, stride, padding, dilation, groups);
  check_residual_term(shift, "shift", x, g);
  check_residual_term(scale, "scale", x, g);
  FF_CHECK_FLOATING(basis, "basis");
  FF_CHECK_SAME_DEVICE(basis, x, "basis", "x");
  FF_CHECK(basis.numel() == acc.numel(), "basis has ", basis.numel(),
           " elements but the weight of this convolution has ", acc.numel(),
           "; pass a tensor shaped like the weight");
  const Residual residual{shift, scale, basis};
  conv2d_sq_sum_into(acc, /*accumulate=*/true, x, g, geo, groups, &residual);
}

}  // namespace

TORCH_LIBRARY_IMPL(fisher_fast, CPU, m) {
  m.impl("conv2d_sq_sum", &conv2d_sq_sum_cpu);
  m.impl("conv2d_sq_sum_", &conv2d_sq_sum_inplace_cpu);
  m.impl("conv2d_residual_sq_sum_", &conv2d_residual_sq_sum_inplace_cpu);
}

}  // namespace fisher_fast
