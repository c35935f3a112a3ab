// patch_rows: im2col of a range of rows of one sample, written straight into a small buffer.
// Each row is Ho runs of Wo entries; a run is a zero head, a copy (strided when stride_w > 1)
// and a zero tail, with the bounds worked out once per row instead of tested per entry.
#include <algorithm>

#include "fisher_fast/conv_patches.h"

namespace fisher_fast {
namespace {

// ceil(a / b) for a >= 0, b >= 1, without forming a + b - 1 (which may pass int64).
int64_t ceil_div_nonneg(int64_t a, int64_t b) { return a / b + (a % b != 0); }

// Output indices o in [0, out) whose input index o * stride - offset lies in [0, size). The
// caller checked that size + padding and the kernel's reach fit int64, so size + offset does.
void valid_range(int64_t offset, int64_t stride, int64_t size, int64_t out, int64_t* lo,
                 int64_t* hi) {
  *lo = offset <= 0 ? 0 : std::min(out, ceil_div_nonneg(offset, stride));
  const int64_t end = size + offset;  // o * stride < end
  *hi = end <= 0 ? 0 : std::min(out, ceil_div_nonneg(end, stride));
  *hi = std::max(*hi, *lo);
}

}  // namespace

bool ConvGeometry::patches_are_input() const {
  return kernel_h == 1 && kernel_w == 1 && stride_h == 1 && stride_w == 1 && pad_h == 0 &&
         pad_w == 0 && out_height == height && out_width == width;
}

template <typename T>
void patch_rows(const T* x, const ConvGeometry& geo, int64_t row_begin, int64_t row_end, T* out) {
  const int64_t wo = geo.out_width, ho = geo.out_height;
  for (int64_t r = row_begin; r < row_end; ++r, out += ho * wo) {
    const int64_t c = r / geo.kernel_size();
    const int64_t i = (r / geo.kernel_w) % geo.kernel_h, j = r % geo.kernel_w;
    const int64_t row_offset = geo.pad_h - i * geo.dilation_h;  // ih = oh * stride_h - offset
    const int64_t col_offset = geo.pad_w - j * geo.dilation_w;
    int64_t oh_lo, oh_hi, ow_lo, ow_hi;
    valid_range(row_offset, geo.stride_h, geo.height, ho, &oh_lo, &oh_hi);
    valid_range(col_offset, geo.stride_w, geo.width, wo, &ow_lo, &ow_hi);
    const T* channel = x + c * geo.height * geo.width;
    std::fill(out, out + oh_lo * wo, T(0));
    for (int64_t oh = oh_lo; oh < oh_hi; ++oh) {
      T* dst = out + oh * wo;
      // First valid entry: input column ow_lo * stride_w - col_offset of input row ih.
      const T* src = channel + (oh * geo.stride_h - row_offset) * geo.width +
                     (ow_lo * geo.stride_w - col_offset);
      std::fill(dst, dst + ow_lo, T(0));
      if (geo.stride_w == 1) {  // runs are short (Wo): an inline loop, not a memcpy call
#pragma omp simd
        for (int64_t ow = ow_lo; ow < ow_hi; ++ow) dst[ow] = src[ow - ow_lo];
      } else {
        for (int64_t ow = ow_lo; ow < ow_hi; ++ow) dst[ow] = src[(ow - ow_lo) * geo.stride_w];
      }
      std::fill(dst + ow_hi, dst + wo, T(0));
    }
    std::fill(out + oh_hi * wo, out + ho * wo, T(0));
  }
}

template void patch_rows<float>(const float*, const ConvGeometry&, int64_t, int64_t, float*);
template void patch_rows<double>(const double*, const ConvGeometry&, int64_t, int64_t, double*);

}  // namespace fisher_fast
