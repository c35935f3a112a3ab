// The Python extension module fisher_fast._C. Importing it loads the library, whose static
// initialisers register the ops with the dispatcher; the module itself only adds build_info().
#include <torch/extension.h>

#include "build_info.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fisher_fast compiled kernels";
  m.def(
      "build_info",
      [] {
        const auto info = fisher_fast::build_info();
        pybind11::dict d;
        d["version"] = info.version;
        d["torch_version"] = info.torch_version;
        d["cpu_kernels"] = info.cpu_kernels;
        d["cuda_kernels"] = info.cuda_kernels;
        d["cuda_version"] = info.cuda_version;
        d["cuda_arch_list"] = info.cuda_arch_list;
        d["debug"] = info.debug;
        d["num_threads"] = info.num_threads;
        d["cxx_compiler"] = info.cxx_compiler;
        d["cuda_compiler"] = info.cuda_compiler;
        d["cuda_host_compiler"] = info.cuda_host_compiler;
        return d;
      },
      "Facts about this build: versions, compilers, which kernels were compiled, architectures, "
      "threads.");
}
