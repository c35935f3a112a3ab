// gemm_nt through the Fortran BLAS symbols torch exports (MKL in the x86 wheels). They are weak
// references: where torch exports none, the products go through at::mm_out instead.
#include <ATen/ATen.h>

#include <limits>

#include "fisher_fast/checks.h"
#include "fisher_fast/gemm_nt.h"

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace fisher_fast {
namespace {

int to_int(int64_t v) {
  FF_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), "matrix size ", v,
           " does not fit the 32-bit BLAS interface");
  return static_cast<int>(v);
}

template <typename T>
void gemm_nt_aten(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
                  T* c, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto at_a = at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, opts);
  const auto at_b = at::from_blob(const_cast<T*>(b), {n, k}, {ldb, 1}, opts);
  auto at_c = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::mm_out(at_c, at_a, at_b.t());
}

// Column-major BLAS sees row-major C (m × n) as Cᵀ (n × m) = B · Aᵀ, with B read transposed.
template <typename T, typename Gemm>
void gemm_nt_blas(Gemm gemm, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
                  int64_t ldb, T* c, int64_t ldc) {
  const int im = to_int(m), in = to_int(n), ik = to_int(k);
  const int ilda = to_int(lda), ildb = to_int(ldb), ildc = to_int(ldc);
  const T one = 1, zero = 0;
  gemm("T", "N", &in, &im, &ik, &one, b, &ildb, a, &ilda, &zero, c, &ildc);
}

}  // namespace

void gemm_nt(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
             int64_t ldb, float* c, int64_t ldc) {
  if (sgemm_ != nullptr) return gemm_nt_blas(sgemm_, m, n, k, a, lda, b, ldb, c, ldc);
  gemm_nt_aten(m, n, k, a, lda, b, ldb, c, ldc);
}

void gemm_nt(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b,
             int64_t ldb, double* c, int64_t ldc) {
  if (dgemm_ != nullptr) return gemm_nt_blas(dgemm_, m, n, k, a, lda, b, ldb, c, ldc);
  gemm_nt_aten(m, n, k, a, lda, b, ldb, c, ldc);
}

}  // namespace fisher_fast
