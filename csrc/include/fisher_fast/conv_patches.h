// im2col of one sample's input, a range of patch rows at a time (the CPU conv kernel's tiles).
#pragma once

#include <cstdint>

namespace fisher_fast {

// Geometry of a 2-D convolution. pad_h / pad_w are the zero rows / columns before the input;
// window entries past the end of the input read as zeros (so any "after" padding is implied by
// the output size).
struct ConvGeometry {
  int64_t height, width;          // input H, W
  int64_t out_height, out_width;  // output Ho, Wo
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w;
  int64_t pad_h, pad_w;
  int64_t dilation_h, dilation_w;

  int64_t positions() const { return out_height * out_width; }
  int64_t kernel_size() const { return kernel_h * kernel_w; }
  // True when the patch matrix is the input itself (1×1 kernel, stride 1, no padding).
  bool patches_are_input() const;
};

// Rows [row_begin, row_end) of the patch matrix U of one input x (C, H, W), contiguous:
// row r = (c, i, j) in weight order (r = (c * kernel_h + i) * kernel_w + j) holds
// x[c, oh * stride_h - pad_h + i * dilation_h, ow * stride_w - pad_w + j * dilation_w] over the
// Ho × Wo output positions (zero outside the input). out: (row_end - row_begin, Ho * Wo).
template <typename T>
void patch_rows(const T* x, const ConvGeometry& geo, int64_t row_begin, int64_t row_end, T* out);

}  // namespace fisher_fast
