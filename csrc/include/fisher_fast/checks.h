// Small input-check macros shared by every op implementation.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include <cstdint>

#define FF_CHECK(cond, ...) TORCH_CHECK(cond, "fisher_fast: ", __VA_ARGS__)

#define FF_CHECK_CONTIGUOUS(t, name) \
  FF_CHECK((t).is_contiguous(), name, " must be contiguous; call .contiguous() first")

#define FF_CHECK_FLOATING(t, name)                      \
  FF_CHECK(at::isFloatingType((t).scalar_type()), name, \
           " must be float16, bfloat16, float32 or float64, got ", (t).scalar_type())

// An accumulator an in-place op adds into: float32 or float64, and contiguous.
#define FF_CHECK_ACCUMULATOR(acc)                                                   \
  FF_CHECK((acc).scalar_type() == at::kFloat || (acc).scalar_type() == at::kDouble, \
           "acc must be float32 or float64, got ", (acc).scalar_type());            \
  FF_CHECK_CONTIGUOUS(acc, "acc")

#define FF_CHECK_SAME_DEVICE(a, b, name_a, name_b)                                         \
  FF_CHECK((a).device() == (b).device(), name_a, " is on ", (a).device(), " but ", name_b, \
           " is on ", (b).device(), "; move both to one device")

namespace fisher_fast {

// a * b, or an error naming `what` when the product does not fit int64 (checked, so correct
// whether or not the compiler wraps signed overflow).
inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t out = 0;
  FF_CHECK(!c10::mul_overflows(a, b, &out), what, " overflows int64 (", a, " * ", b,
           "); the sizes are too large, use smaller ones");
  return out;
}

// a + b, or an error naming `what` when the sum does not fit int64.
inline int64_t checked_add(int64_t a, int64_t b, const char* what) {
  int64_t out = 0;
  FF_CHECK(!c10::add_overflows(a, b, &out), what, " overflows int64 (", a, " + ", b,
           "); the sizes are too large, use smaller ones");
  return out;
}

}  // namespace fisher_fast
