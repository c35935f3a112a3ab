// gemm_nn: oneDNN's brgemm micro-kernel for float32 (AVX-512 code on CPUs where MKL's sgemm
// picks a narrower path), the Fortran BLAS symbols torch exports otherwise. The BLAS symbols are
// weak references: where torch exports none, the products go through at::mm_out.
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <limits>

#include "fisher_fast/checks.h"
#include "fisher_fast/gemm_nn.h"

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
void gemm_nn_aten(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
                  T* c, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto at_a = at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, opts);
  const auto at_b = at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, opts);
  auto at_c = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::mm_out(at_c, at_a, at_b);
}

// Column-major BLAS sees row-major C (m × n) as Cᵀ (n × m) = Bᵀ · Aᵀ.
template <typename T, typename Gemm>
void gemm_nn_blas(Gemm gemm, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
                  int64_t ldb, T* c, int64_t ldc) {
  const int im = to_int(m), in = to_int(n), ik = to_int(k);
  const int ilda = to_int(lda), ildb = to_int(ldb), ildc = to_int(ldc);
  const T one = 1, zero = 0;
  gemm("N", "N", &in, &im, &ik, &one, b, &ildb, a, &ilda, &zero, c, &ildc);
}

// The float32 brgemm exists only in newer torch (CPUBlas.h then defines CPUBLAS_BRGEMM_F32F32F32);
// it throws where oneDNN has no micro-kernel for this CPU.
bool probe_brgemm() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  const float a = 2.0f, b = 3.0f;
  float c = 0.0f;
  try {
    at::native::cpublas::brgemm(1, 1, 1, 1, 1, 1, false, &a, &b, &c);
    at::native::cpublas::brgemm_release(false);
  } catch (const c10::Error&) {
    return false;
  }
  return c == 6.0f;
#else
  return false;
#endif
}

}  // namespace

bool gemm_nn_uses_brgemm() {
  static const bool usable = probe_brgemm();
  return usable;
}

void gemm_nn_release() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if (gemm_nn_uses_brgemm()) at::native::cpublas::brgemm_release(false);
#endif
}

void gemm_nn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
             int64_t ldb, float* c, int64_t ldc) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if (gemm_nn_uses_brgemm()) {
    return at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, false, a, b, c);
  }
#endif
  if (sgemm_ != nullptr) return gemm_nn_blas(sgemm_, m, n, k, a, lda, b, ldb, c, ldc);
  gemm_nn_aten(m, n, k, a, lda, b, ldb, c, ldc);
}

void gemm_nn(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b,
             int64_t ldb, double* c, int64_t ldc) {
  if (dgemm_ != nullptr) return gemm_nn_blas(dgemm_, m, n, k, a, lda, b, ldb, c, ldc);
  gemm_nn_aten(m, n, k, a, lda, b, ldb, c, ldc);
}

}  // namespace fisher_fast
