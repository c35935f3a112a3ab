// Calls fisher_fast's Fréchet op from C++, through the PyTorch dispatcher and without Python, and
// checks the distance of two small FIMs against a value worked out by hand. Exits with 1 if the
// op gives anything else, so it doubles as the CMake build's smoke test.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>

#include "build_info.h"
#include "fisher_fast/frechet_math.h"

int main() {
  const fisher_fast::BuildInfo info = fisher_fast::build_info();
  std::printf("fisher_fast %s, built against torch %s\n", info.version.c_str(),
              info.torch_version.c_str());

  // a = (9, 16, 0, 0, 0) and b = 3 * (16, 9, 0, 0, 0). At unit trace they are (0.36, 0.64, 0...)
  // and (0.64, 0.36, 0...), so sqrt(a) - sqrt(b) = (-0.2, 0.2, 0...) and
  // d = ||(-0.2, 0.2)|| / sqrt(2) = 0.2.
  const at::Tensor a = at::tensor({9.0f, 16.0f, 0.0f, 0.0f, 0.0f});
  const at::Tensor b = at::tensor({48.0f, 27.0f, 0.0f, 0.0f, 0.0f});
  const double expected = 0.2;

  const auto frechet_sums = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("fisher_fast::frechet_sums", "")
                                .typed<at::Tensor(at::TensorList, at::TensorList)>();
  const at::Tensor sums = frechet_sums.call({a}, {b});
  const auto s = sums.accessor<double, 2>();
  const double d =
      std::sqrt(1.0 - s[0][fisher_fast::kCross] /
                          std::sqrt(s[0][fisher_fast::kSumRef] * s[0][fisher_fast::kSumOther]));
  std::printf("frechet distance %.17g, expected %.17g\n", d, expected);

  const bool valid = s[0][fisher_fast::kInvalidRef] == 0 && s[0][fisher_fast::kInvalidOther] == 0;
  if (!valid || std::abs(d - expected) > 1e-12) {
    std::fprintf(stderr, "distance_demo: wrong result from fisher_fast::frechet_sums\n");
    return 1;
  }
  return 0;
}
