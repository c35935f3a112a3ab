// Build facts recorded at compile time from definitions passed by setup.py or CMake.
#include "build_info.h"

#include <ATen/Parallel.h>

#include "compiler_id.h"

#ifndef FISHER_FAST_VERSION
#define FISHER_FAST_VERSION "unknown"
#endif
#ifndef FISHER_FAST_TORCH_VERSION
#define FISHER_FAST_TORCH_VERSION "unknown"
#endif
#ifndef FISHER_FAST_CUDA_VERSION
#define FISHER_FAST_CUDA_VERSION ""
#endif
#ifndef FISHER_FAST_CUDA_ARCHS
#define FISHER_FAST_CUDA_ARCHS ""
#endif

namespace fisher_fast {

BuildInfo build_info() {
  BuildInfo info;
  info.version = FISHER_FAST_VERSION;
  info.torch_version = FISHER_FAST_TORCH_VERSION;
  info.cpu_kernels = true;
#ifdef FISHER_FAST_WITH_CUDA
  info.cuda_kernels = true;
#else
  info.cuda_kernels = false;
#endif
  info.cuda_version = FISHER_FAST_CUDA_VERSION;
  info.cuda_arch_list = FISHER_FAST_CUDA_ARCHS;
#ifdef FISHER_FAST_DEBUG
  info.debug = true;
#else
  info.debug = false;
#endif
  info.num_threads = at::get_num_threads();
  info.cxx_compiler = compiler_id();
#ifdef FISHER_FAST_WITH_CUDA
  info.cuda_compiler = cuda_compiler();
  info.cuda_host_compiler = cuda_host_compiler();
#endif
  return info;
}

}  // namespace fisher_fast
