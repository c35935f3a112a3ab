// The CUDA side of build_info(): nvcc's version and the host compiler it ran, both seen from a
// translation unit that nvcc compiles.
#include <string>

#include "build_info.h"
#include "compiler_id.h"

namespace fisher_fast {

std::string cuda_compiler() {
  return "nvcc " + std::to_string(__CUDACC_VER_MAJOR__) + "." +
         std::to_string(__CUDACC_VER_MINOR__) + "." + std::to_string(__CUDACC_VER_BUILD__);
}

std::string cuda_host_compiler() { return compiler_id(); }

}  // namespace fisher_fast
