// Row-major C = A · Bᵀ on raw CPU buffers, for many small products inside a parallel region.
#pragma once

#include <cstdint>

namespace fisher_fast {

// c (m × n, row stride ldc) = a (m × k, row stride lda) · b (n × k, row stride ldb)ᵀ.
// Calls the BLAS that torch links (sgemm_/dgemm_) on the calling thread, or at::mm_out where
// torch exports no BLAS symbols. m, n, k and the strides must fit in 32 bits.
void gemm_nt(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
             int64_t ldb, float* c, int64_t ldc);
void gemm_nt(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b,
             int64_t ldb, double* c, int64_t ldc);

}  // namespace fisher_fast
