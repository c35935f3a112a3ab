// The compiler of the translation unit that includes this header, as "name version", for
// build_info(): included by a .cpp file it names the C++ compiler, by a .cu file nvcc's host one.
#pragma once

#include <string>

namespace fisher_fast {

inline std::string compiler_id() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__INTEL_LLVM_COMPILER)
  return "icx " + std::to_string(__INTEL_LLVM_COMPILER);
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#elif defined(_MSC_FULL_VER)
  return "msvc " + std::to_string(_MSC_FULL_VER);
#else
  return "unknown";
#endif
}

}  // namespace fisher_fast
