// Small input-check macros shared by every op implementation.
#pragma once

#include <torch/types.h>

#define FF_CHECK(cond, ...) TORCH_CHECK(cond, "fisher_fast: ", __VA_ARGS__)

#define FF_CHECK_CONTIGUOUS(t, name) \
  FF_CHECK((t).is_contiguous(), name, " must be contiguous; call .contiguous() first")

#define FF_CHECK_FLOATING(t, name)                      \
  FF_CHECK(at::isFloatingType((t).scalar_type()), name, \
           " must be float16, bfloat16, float32 or float64, got ", (t).scalar_type())

#define FF_CHECK_SAME_DEVICE(a, b, name_a, name_b)                                         \
  FF_CHECK((a).device() == (b).device(), name_a, " is on ", (a).device(), " but ", name_b, \
           " is on ", (b).device(), "; move both to one device")
