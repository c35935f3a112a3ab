// What this build of the library contains, for fisher_fast.build_info().
#pragma once

#include <string>
#include <vector>

namespace fisher_fast {

struct BuildInfo {
  std::string version;         // package version the library was built for
  std::string torch_version;   // torch version the library was compiled against
  bool cpu_kernels;            // always true: the CPU kernels are always compiled
  bool cuda_kernels;           // CUDA kernels compiled into this library
  std::string cuda_version;    // CUDA toolkit version used, empty without CUDA
  std::string cuda_arch_list;  // architectures compiled for (TORCH_CUDA_ARCH_LIST form)
  bool debug;                  // built with -O0 -g
  int num_threads;             // intra-op threads the CPU kernels will use now
};

BuildInfo build_info();

}  // namespace fisher_fast
