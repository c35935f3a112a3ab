// CPU kernel of fisher_fast::per_sample_sq_sum: out[b] = sum_n (g[n,b]^T x[n,b])^2.
//
// The tiled loop of sq_sum_tiles.h with, per sample and block, the output gradient g[n,b]
// (T × O) transposed once into O × T (the chunk operand; read in place where g is stored with
// the positions innermost) and the input x[n,b] (T × I) read in place (or the other way round,
// x transposed and g read in place, when the layer has fewer inputs than outputs): each tile of
// rows of g[n,b]^T is multiplied by x[n,b] and its squares are summed over the samples while the
// tile is in cache. Memory: the result per split plus, per thread, one chunk of transposed
// gradients and a tile or two, whatever N.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "fisher_fast/checks.h"
#include "fisher_fast/sq_sum_tiles.h"

namespace fisher_fast {
namespace {

void check_inputs(const at::Tensor& g, const at::Tensor& x, at::ScalarType acc_dtype) {
  FF_CHECK(g.dim() == 4 && x.dim() == 4, "g and x must be 4-D (N, B, T, O) and (N, B, T, I); got ",
           g.sizes(), " and ", x.sizes());
  FF_CHECK(g.size(0) == x.size(0) && g.size(1) == x.size(1) && g.size(2) == x.size(2), "g ",
           g.sizes(), " and x ", x.sizes(), " must agree in samples, blocks and positions");
  FF_CHECK_FLOATING(g, "g");
  FF_CHECK(g.scalar_type() == x.scalar_type(), "g and x must share one dtype");
  FF_CHECK(acc_dtype == at::kFloat || acc_dtype == at::kDouble,
           "acc_dtype must be float32 or float64, got ", acc_dtype);
  FF_CHECK_SAME_DEVICE(g, x, "g", "x");
  checked_mul(checked_mul(g.size(1), g.size(3), "the result's size"), x.size(3),
              "the result's size");
}

// out (B × O × I elements, contiguous, float32 or float64) = the sums, or += with
// `accumulate`, for checked inputs.
void per_sample_sq_sum_into(at::Tensor& out, bool accumulate, const at::Tensor& g,
                            const at::Tensor& x) {
  const int64_t n = g.size(0), blocks = g.size(1), positions = g.size(2);
  const int64_t out_f = g.size(3), in_f = x.size(3);
  if (n == 0 || positions == 0 || out_f == 0 || in_f == 0) {  // the sums are zeros (or empty)
    if (!accumulate) out.zero_();
    return;
  }
  const auto acc_dtype = out.scalar_type();
  // Products run in float32 for reduced-precision inputs and in the input's own type otherwise.
  const auto compute = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // A gradient laid out with the positions innermost (a language model's loss over logits
  // transposed to (N, V, T) gives one) holds g[n,b]^T already: its rows are read in place.
  const auto gt = g.to(compute).transpose(2, 3);  // (N, B, O, T)
  const bool g_rows_in_place = gt.is_contiguous();
  const auto gc = g_rows_in_place ? gt : g.to(compute).contiguous();
  const auto xc = x.to(compute).contiguous();
  // The micro-kernel forms rows × width products; a narrow width wastes its vector lanes (24 or
  // 40 columns ran 1.3-1.7x slower than the other way round), so the wider side of the layer
  // is the width: the result is then formed transposed, x[n,b]^T g[n,b] (I × O), each tile
  // transposed back as it is written out. The row operand (T × rows per sample) is transposed into
  // the chunk buffer, unless it is g stored positions-innermost; the width operand is read in
  // place.
  const bool swapped = in_f < out_f && !g_rows_in_place;
  const int64_t height = swapped ? in_f : out_f, width = swapped ? out_f : in_f;
  const at::Tensor& row_operand = swapped ? xc : gc;
  const at::Tensor& width_operand = swapped ? gc : xc;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk_elems = g_rows_in_place ? 0 : height * positions;
  const TilePlan plan = plan_tiles(n, blocks, height, width, positions, chunk_elems,
                                   at::elementSize(compute), threads);
  AT_DISPATCH_FLOATING_TYPES(compute, "per_sample_sq_sum_cpu_compute", [&] {
    using compute_t = scalar_t;
    const compute_t* row_data = row_operand.data_ptr<compute_t>();
    const compute_t* width_data = width_operand.data_ptr<compute_t>();
    const auto load = [&](int64_t s, int64_t b, compute_t* chunk) {
      if (!g_rows_in_place) {
        transpose(row_data + (s * blocks + b) * positions * height, positions, height, chunk);
      }
    };
    // Rows [r0, r1) of the row operand's transpose (rows × T) times the width operand (T × width).
    const auto factors = [&](int64_t s, int64_t b, int64_t r0, int64_t, const compute_t* chunk,
                             compute_t*) {
      const int64_t first_row = g_rows_in_place ? (s * blocks + b) * height + r0 : r0;
      const compute_t* rows = (g_rows_in_place ? row_data : chunk) + first_row * positions;
      return TileFactors<compute_t>{rows, width_data + (s * blocks + b) * positions * width};
    };
    AT_DISPATCH_FLOATING_TYPES(acc_dtype, "per_sample_sq_sum_cpu_acc", [&] {
      tiled_sq_sum<compute_t, scalar_t>(plan, n, blocks, height, width, positions, chunk_elems, out,
                                        swapped, accumulate, load, factors);
    });
  });
}

at::Tensor per_sample_sq_sum_cpu(const at::Tensor& g, const at::Tensor& x,
                                 at::ScalarType acc_dtype) {
  check_inputs(g, x, acc_dtype);
  auto out = at::empty({g.size(1), g.size(3), x.size(3)}, g.options().dtype(acc_dtype));
  per_sample_sq_sum_into(out, /*accumulate=*/false, g, x);
  return out;
}

void per_sample_sq_sum_inplace_cpu(at::Tensor& acc, const at::Tensor& g, const at::Tensor& x) {
  FF_CHECK_ACCUMULATOR(acc);
  check_inputs(g, x, acc.scalar_type());
  FF_CHECK_SAME_DEVICE(acc, g, "acc", "g");
  const int64_t blocks = g.size(1), out_f = g.size(3), in_f = x.size(3);
  FF_CHECK(acc.numel() == blocks * out_f * in_f, "acc has ", acc.numel(), " elements but g ",
           g.sizes(), " and x ", x.sizes(), " give ", blocks * out_f * in_f,
           " (B * O * I); pass an accumulator shaped like the result (B, O, I)");
  per_sample_sq_sum_into(acc, /*accumulate=*/true, g, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(fisher_fast, CPU, m) {
  m.impl("per_sample_sq_sum", &per_sample_sq_sum_cpu);
  m.impl("per_sample_sq_sum_", &per_sample_sq_sum_inplace_cpu);
}

}  // namespace fisher_fast
