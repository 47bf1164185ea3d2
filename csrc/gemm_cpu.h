// A small fp32 GEMM for the CPU soft-warp kernels (csrc/losses_cpu.cpp).
//
//     C(i, j) (+)= Σ_p A(i, p) · B(p, j)        i < m, j < n, p < k
//     A(i, p) = a[i·a_rs + p·a_cs]   (any strides: the kernel broadcasts one element of A at a time)
//     B(p, j) = b[p·ldb + j]         (rows of B contiguous: the kernel loads 32 columns of a row per step)
//     C(i, j) = c[i·ldc + j]
//
// Why not at::mm: the loss multiplies many small blocks (64 query rows × 256 keys × 320 channels) from inside
// the OpenMP workers, where at::mm runs the BLAS single-threaded; on the AMD EPYC machines this project builds
// on, MKL reached about 60 GFLOP/s per core there, half of the core's FMA peak, while this register-blocked
// AVX-512 kernel (12 rows × 32 columns of C held in 24 zmm registers for the whole k loop) runs at 85–110.
// Without AVX-512 (checked at run time) or off x86-64, it falls back to at::mm_out / addmm_ on strided views.
#pragma once

#include <cstdint>

namespace adaface::cpu {

enum class GemmImpl : int { kAuto = 0, kAten = 1 };

void gemm_f32(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
              int64_t ldb, float* c, int64_t ldc, bool accumulate);

// Which implementation gemm_f32 uses (process-wide; tests force the ATen fallback to cover it on AVX-512
// machines). Returns the previous setting.
GemmImpl set_gemm_impl(GemmImpl impl);
bool gemm_uses_avx512();

}  // namespace adaface::cpu
