// Input checks of the frechet_sums op, shared by its CPU and CUDA implementations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "fisher_fast/checks.h"

namespace fisher_fast {

// ref: P tensors; others: K * P tensors, tensor p of FIM k at k * P + p. All must share one
// floating dtype, be contiguous, live on one device of `device_type`, and match ref in size.
inline void check_frechet_inputs(at::TensorList ref, at::TensorList others,
                                 c10::DeviceType device_type) {
  const int64_t n_seg = static_cast<int64_t>(ref.size());
  FF_CHECK(n_seg > 0, "the reference list is empty");
  FF_CHECK(others.size() % ref.size() == 0, "got ", others.size(),
           " tensors in 'others', which is not a multiple of the ", n_seg,
           " tensors in 'ref'; each other FIM needs one tensor per reference tensor");
  const auto dtype = ref[0].scalar_type();
  for (const auto& t : ref) {
    FF_CHECK_FLOATING(t, "every FIM tensor");
    FF_CHECK(t.scalar_type() == dtype, "all FIM tensors must share one dtype; got ", dtype, " and ",
             t.scalar_type());
    FF_CHECK_CONTIGUOUS(t, "every FIM tensor");
    FF_CHECK(t.device().type() == device_type, "expected ", device_type, " tensors, got one on ",
             t.device());
    FF_CHECK_SAME_DEVICE(t, ref[0], "a reference tensor", "the first reference tensor");
  }
  for (size_t i = 0; i < others.size(); ++i) {
    const auto& t = others[i];
    const int64_t seg = static_cast<int64_t>(i) % n_seg;
    const auto& r = ref[seg];
    FF_CHECK(t.scalar_type() == dtype, "all FIM tensors must share one dtype; got ", dtype, " and ",
             t.scalar_type());
    FF_CHECK_CONTIGUOUS(t, "every FIM tensor");
    FF_CHECK_SAME_DEVICE(t, r, "an 'other' tensor", "the reference");
    FF_CHECK(t.numel() == r.numel(), "tensor ", seg, " of FIM ", static_cast<int64_t>(i) / n_seg,
             " has ", t.numel(), " elements but the reference has ", r.numel());
  }
}

}  // namespace fisher_fast
