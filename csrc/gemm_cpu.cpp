// The fp32 GEMM of gemm_cpu.h, and two test hooks registered as ops:
//   cpu_gemm_ext(Tensor a, Tensor b, Tensor? c) -> Tensor     (c + a·b, or a·b; a with any strides)
//   cpu_gemm_impl_ext(int impl) -> int                        (0 auto, 1 ATen fallback; returns the previous)
#include "gemm_cpu.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <optional>
#include <utility>

#if defined(__GNUC__) && defined(__x86_64__)
#define ADAFACE_AVX512_GEMM 1
#include <immintrin.h>
#endif

namespace adaface::cpu {
namespace {

std::atomic<int> g_impl{static_cast<int>(GemmImpl::kAuto)};

void gemm_aten(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
               int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor A = at::from_blob(const_cast<float*>(a), {m, k}, {a_rs, a_cs}, f32);
  const at::Tensor B = at::from_blob(const_cast<float*>(b), {k, n}, {ldb, 1}, f32);
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, f32);
  if (accumulate) {
    C.addmm_(A, B);
  } else {
    at::mm_out(C, A, B);
  }
}

#ifdef ADAFACE_AVX512_GEMM
constexpr int kMR = 12;  // rows of C per micro-tile: 2·12 accumulators + 2 rows of B + 1 broadcast ≤ 32 zmm
constexpr int64_t kNR = 32;

// One MR × 32 tile of C over the whole k loop. MASKED: the tile's last columns are past n (lanes off in m0/m1).
template <int MR, bool MASKED>
__attribute__((target("avx512f"))) void micro_tile(int64_t k, const float* a, int64_t a_rs, int64_t a_cs,
                                                    const float* b, int64_t ldb, float* c, int64_t ldc,
                                                    __mmask16 m0, __mmask16 m1, bool accumulate) {
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    c0[i] = _mm512_setzero_ps();
    c1[i] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < k; ++p) {
    const float* bp = b + p * ldb;
    const __m512 b0 = MASKED ? _mm512_maskz_loadu_ps(m0, bp) : _mm512_loadu_ps(bp);
    const __m512 b1 = MASKED ? _mm512_maskz_loadu_ps(m1, bp + 16) : _mm512_loadu_ps(bp + 16);
    const float* ap = a + p * a_cs;
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m512 ai = _mm512_set1_ps(ap[i * a_rs]);
      c0[i] = _mm512_fmadd_ps(ai, b0, c0[i]);
      c1[i] = _mm512_fmadd_ps(ai, b1, c1[i]);
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    float* ci = c + i * ldc;
    if (MASKED) {
      if (accumulate) {
        c0[i] = _mm512_add_ps(c0[i], _mm512_maskz_loadu_ps(m0, ci));
        c1[i] = _mm512_add_ps(c1[i], _mm512_maskz_loadu_ps(m1, ci + 16));
      }
      _mm512_mask_storeu_ps(ci, m0, c0[i]);
      _mm512_mask_storeu_ps(ci + 16, m1, c1[i]);
    } else {
      if (accumulate) {
        c0[i] = _mm512_add_ps(c0[i], _mm512_loadu_ps(ci));
        c1[i] = _mm512_add_ps(c1[i], _mm512_loadu_ps(ci + 16));
      }
      _mm512_storeu_ps(ci, c0[i]);
      _mm512_storeu_ps(ci + 16, c1[i]);
    }
  }
}

using TileFn = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t, __mmask16,
                        __mmask16, bool);

template <bool MASKED, int... R>
constexpr auto make_tile_table(std::integer_sequence<int, R...>) {
  return std::array<TileFn, sizeof...(R)>{&micro_tile<R + 1, MASKED>...};
}

// kTiles[masked][rows - 1]: the micro-tile for 1..12 rows
const std::array<TileFn, kMR> kTiles[2] = {make_tile_table<false>(std::make_integer_sequence<int, kMR>{}),
                                           make_tile_table<true>(std::make_integer_sequence<int, kMR>{})};

void gemm_avx512(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
                 int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  // Column panels outside, row tiles inside: one k × 32 panel of B stays in L1/L2 while every row tile uses it.
  for (int64_t j0 = 0; j0 < n; j0 += kNR) {
    const int64_t nr = std::min(kNR, n - j0);
    const bool masked = nr < kNR;
    const __mmask16 m0 = nr >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nr) - 1u);
    const __mmask16 m1 = nr >= 32 ? __mmask16(0xFFFF) : (nr > 16 ? __mmask16((1u << (nr - 16)) - 1u) : 0);
    for (int64_t i0 = 0; i0 < m; i0 += kMR) {
      const int64_t mr = std::min<int64_t>(kMR, m - i0);
      kTiles[masked][mr - 1](k, a + i0 * a_rs, a_rs, a_cs, b + j0, ldb, c + i0 * ldc + j0, ldc, m0, m1, accumulate);
    }
  }
}
#endif

}  // namespace

bool gemm_uses_avx512() {
#ifdef ADAFACE_AVX512_GEMM
  static const bool has = __builtin_cpu_supports("avx512f");
  return has && g_impl.load(std::memory_order_relaxed) == static_cast<int>(GemmImpl::kAuto);
#else
  return false;
#endif
}

GemmImpl set_gemm_impl(GemmImpl impl) { return static_cast<GemmImpl>(g_impl.exchange(static_cast<int>(impl))); }

void gemm_f32(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
              int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {  // an empty sum: C = 0, or C unchanged
    if (!accumulate)
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.f);
    return;
  }
#ifdef ADAFACE_AVX512_GEMM
  if (gemm_uses_avx512()) {
    gemm_avx512(m, n, k, a, a_rs, a_cs, b, ldb, c, ldc, accumulate);
    return;
  }
#endif
  gemm_aten(m, n, k, a, a_rs, a_cs, b, ldb, c, ldc, accumulate);
}

namespace {

at::Tensor cpu_gemm_op(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& c) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "cpu_gemm_ext: a [m, k] and b [k, n] expected");
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat, "cpu_gemm_ext: float32 only");
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "cpu_gemm_ext: CPU tensors only");
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  const at::Tensor bb = b.stride(1) == 1 ? b : b.contiguous();
  at::Tensor out;
  if (c.has_value()) {
    TORCH_CHECK(c->sizes() == at::IntArrayRef({m, n}) && c->scalar_type() == at::kFloat, "cpu_gemm_ext: c [m, n]");
    out = c->contiguous().clone();
  } else {
    out = at::empty({m, n}, a.options());
  }
  // a keeps its strides (transposed views exercise the strided broadcast loads)
  gemm_f32(m, n, k, a.const_data_ptr<float>(), a.stride(0), a.stride(1), bb.const_data_ptr<float>(), bb.stride(0),
           out.data_ptr<float>(), n, c.has_value());
  return out;
}

int64_t cpu_gemm_impl_op(int64_t impl) {
  TORCH_CHECK(impl == 0 || impl == 1, "cpu_gemm_impl_ext: 0 (auto) or 1 (ATen) expected, got ", impl);
  return static_cast<int64_t>(set_gemm_impl(static_cast<GemmImpl>(impl)));
}

}  // namespace
}  // namespace adaface::cpu

TORCH_LIBRARY_FRAGMENT(adaface, m) {
  m.def("cpu_gemm_ext(Tensor a, Tensor b, Tensor? c=None) -> Tensor");
  // no tensor arguments: catch-all kernels
  m.def("cpu_gemm_impl_ext(int impl) -> int", &adaface::cpu::cpu_gemm_impl_op);
  m.def("cpu_gemm_uses_avx512_ext() -> bool", &adaface::cpu::gemm_uses_avx512);
}

TORCH_LIBRARY_IMPL(adaface, CPU, m) { m.impl("cpu_gemm_ext", &adaface::cpu::cpu_gemm_op); }
