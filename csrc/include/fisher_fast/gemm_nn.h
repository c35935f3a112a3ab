// Row-major C = A · B on raw CPU buffers, for many small products inside a parallel region.
#pragma once

#include <cstdint>

namespace fisher_fast {

// c (m × n, row stride ldc) = a (m × k, row stride lda) · b (k × n, row stride ldb), on the
// calling thread. float32 goes to oneDNN's batch-reduce GEMM micro-kernel (at::native::cpublas::
// brgemm) where this CPU supports it, else to the BLAS torch links (sgemm_); float64 to dgemm_.
// Where torch exports no BLAS symbols, at::mm_out does the product. Sizes must fit in 32 bits.
void gemm_nn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
             int64_t ldb, float* c, int64_t ldc);
void gemm_nn(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b,
             int64_t ldb, double* c, int64_t ldc);

// Whether float32 products use the brgemm micro-kernel. Call once outside parallel regions
// before gemm_nn (it probes the micro-kernel on first use); threads that ran gemm_nn call
// gemm_nn_release when done.
bool gemm_nn_uses_brgemm();
void gemm_nn_release();

}  // namespace fisher_fast
