// What this build of the library contains, for fisher_fast.build_info().
#pragma once

#include <string>
#include <vector>

// Names the library exports; everything else is compiled with hidden visibility.
#if defined(_WIN32)
#define FISHER_FAST_API
#else
#define FISHER_FAST_API __attribute__((visibility("default")))
#endif

namespace fisher_fast {

struct BuildInfo {
  std::string version;             // package version the library was built for
  std::string torch_version;       // torch version the library was compiled against
  bool cpu_kernels;                // always true: the CPU kernels are always compiled
  bool cuda_kernels;               // CUDA kernels compiled into this library
  std::string cuda_version;        // CUDA toolkit version used, empty without CUDA
  std::string cuda_arch_list;      // architectures compiled for (TORCH_CUDA_ARCH_LIST form)
  bool debug;                      // built with -O0 -g
  int num_threads;                 // intra-op threads the CPU kernels will use now
  std::string cxx_compiler;        // C++ compiler of the .cpp files, "name version"
  std::string cuda_compiler;       // nvcc's version ("nvcc 12.4.131"), empty without CUDA
  std::string cuda_host_compiler;  // host compiler nvcc ran (-ccbin), empty without CUDA
};

FISHER_FAST_API BuildInfo build_info();

// Defined in cuda/build_info_cuda.cu (compiled by nvcc), called only in CUDA builds.
std::string cuda_compiler();
std::string cuda_host_compiler();

}  // namespace fisher_fast
