// Operator schemas of the fisher_fast library. Implementations are registered per device in
// cpu/ and cuda/; fake (meta) implementations live in the Python package (fisher_fast/ops.py).
#include <torch/library.h>

TORCH_LIBRARY(fisher_fast, m) {
  // Sums behind the Fréchet distance of one reference diagonal FIM against K others.
  // ref: the reference FIM as a list of P contiguous tensors (any shapes).
  // others: K FIMs, flattened to K * P tensors, tensor p of each matching ref[p] in size.
  // Returns a (K, 5) float64 tensor: [sum ref, sum other, sum sqrt(ref*other),
  // invalid entries in ref, invalid entries in other] (invalid: negative, NaN or infinite).
  m.def("frechet_sums(Tensor[] ref, Tensor[] others) -> Tensor");

  // Sum over samples of squared per-sample products: out[b] = sum_n (g[n,b]^T x[n,b])^2.
  // g: (N, B, T, O), x: (N, B, T, I), same dtype and device; B independent blocks (groups).
  // Returns (B, O, I) in acc_dtype (float32 or float64). Per-sample products are never stored.
  m.def("per_sample_sq_sum(Tensor g, Tensor x, ScalarType acc_dtype) -> Tensor");
  // In place (CPU only): acc += the same sums, in acc's dtype (float32 or float64); acc is
  // contiguous with B * O * I elements (any shape), so a running total needs no result of its own.
  m.def("per_sample_sq_sum_(Tensor(a!) acc, Tensor g, Tensor x) -> ()");

  // Sum over samples of the squared per-sample weight gradients of a 2-D convolution (CPU only):
  // out[b] = sum_n (G[n,b] U[n,b]^T)^2 with U the im2col patches of x, never materialised.
  // x: (N, C, H, W) layer input, g: (N, O, Ho, Wo) output gradient, same dtype; padding: zero
  // rows/columns before the input (entries past its end read as zero, so Ho, Wo fix the rest:
  // as many zeros after the input as before it, or one more, as 'same' padding may have).
  // Returns (groups, O/groups, C/groups * kernel_h * kernel_w) in acc_dtype (float32 or float64).
  m.def(
      "conv2d_sq_sum(Tensor x, Tensor g, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, ScalarType acc_dtype) -> Tensor");
  // In place: acc += the same sums, in acc's dtype (float32 or float64); acc is contiguous with
  // the weight's O * C/groups * kernel_h * kernel_w elements (any shape, the weight's say), so
  // a running total needs no result tensor of its own.
  m.def(
      "conv2d_sq_sum_(Tensor(a!) acc, Tensor x, Tensor g, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> ()");
  // In place (CPU only): acc += sum_n R[n]^2, R[n] = G[n] U[n]^T - shift[n] 1^T - scale[n] ⊙
  // basis (per output channel o: the per-sample gradient's row minus shift[n,o] and minus
  // scale[n,o] times the basis's row o). shift, scale: (N, O); basis and acc: the weight's
  // O * C/groups * kernel_h * kernel_w elements (acc float32 or float64, contiguous). The
  // per-sample gradients of a weight-standardised convolution are such residuals.
  m.def(
      "conv2d_residual_sq_sum_(Tensor(a!) acc, Tensor x, Tensor g, Tensor shift, Tensor scale, "
      "Tensor basis, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups) -> ()");

  // In place, for a linear layer without extra axes (CPU only): weight_acc += (g∘g)ᵀ (x∘x) and
  // bias_acc += column sums of g∘g, the sums over samples of the squared per-sample gradients.
  // g: (N, O) output gradients, x: (N, I) inputs, same floating dtype; weight_acc (O, I) and
  // bias_acc (O,) float32 or float64, either may be None. With g_squared, g already holds g∘g
  // (e.g. summed over several backward passes). Allocates nothing the size of the batch.
  m.def(
      "linear_sq_sum_(Tensor(a!)? weight_acc, Tensor(b!)? bias_acc, Tensor g, Tensor x, "
      "bool g_squared=False) -> ()");
}
