// CUDA kernels of the two losses (both in this one translation unit to keep the build short); formulas in
// losses.h. fp32/fp16/bf16 inputs, fp32 accumulation, fp32 losses; registered for the CUDA key below.
//
// delta cosine: one warp per row, two streaming passes (reduce, then materialise Δ per element).
// soft warp: flash-style tiles of 32 query rows × 32 keys with 256 threads (each owns a 2×2 sub-tile), fp32
// FMA through shared memory. Rows with weight 0 are compacted away on the device (a stable sort puts each
// batch's selected rows first; per-batch counts bound the work, no host sync), so they cost nothing. The
// forward saves the Triton backend's state (losses.h): warped, lse in base 2, order and count (int32).
//   forward  (grid: row tiles × B):  online softmax (base 2) over key tiles; the fp32 accumulator `warped` is
//            owned by the row tile (rescale-and-add in place); lse2 saved.
//   backward: row kernel dW = g·d(1 − cos)/dw, D = dW·w, d feat_subj; dQ kernel (grid: row tiles × B)
//            recomputes P = 2^(scale·log2e·S − lse2) and dS = scale·P·(dW·v − D) per key tile; dK/dV kernel
//            (grid: key tiles × B) walks the selected row tiles of its batch (the saved order and count).
//            Every fp32 accumulator has exactly one owning block. The tables of row and key tiles are loaded
//            by load_row_tile / load_key_tile, the tiles themselves by tile_dot / tile_accumulate.
#include "cosine.h"
#include "losses.h"

#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs cuSPARSE/cuBLAS headers
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace adaface {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / kWarp;  // delta cosine: one warp per row
constexpr int kTile = 32;                        // soft warp: query rows, keys and reduction chunk per tile
constexpr int kPad = kTile + 1;

template <typename T>
__device__ __forceinline__ float to_f(T x) {
  return static_cast<float>(x);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One warp per row (delta cosine, the soft-warp row kernel): this thread's row (maybe past the end) and lane.
struct WarpRow {
  int64_t row;
  int lane;
};

__device__ __forceinline__ WarpRow warp_row() {
  return {static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp,
          static_cast<int>(threadIdx.x % kWarp)};
}

// x·y, x·x and y·y of one row: each lane sums the elements lane, lane + 32, ... and the warp adds the lanes
// (every lane gets the sums); `element(i)` gives (x_i, y_i).
struct RowDots {
  float xy, xx, yy;
};

template <typename Element>
__device__ __forceinline__ RowDots warp_row_dots(int64_t C, int lane, Element element) {
  float xy = 0.f, xx = 0.f, yy = 0.f;
  for (int64_t i = lane; i < C; i += kWarp) {
    const float2 e = element(i);
    xy += e.x * e.y;
    xx += e.x * e.x;
    yy += e.y * e.y;
  }
  return {warp_sum(xy), warp_sum(xx), warp_sum(yy)};
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ------------------------------------------------------------------------------------------------
// delta cosine

template <typename T>
__global__ void delta_fwd_kernel(const T* __restrict__ bs, const T* __restrict__ as, const T* __restrict__ bc,
                                 const T* __restrict__ ac, float* __restrict__ loss, float* __restrict__ stats,
                                 int64_t rows, int64_t C, float eps) {
  const auto [row, lane] = warp_row();
  if (row >= rows) return;  // uniform per warp
  const int64_t o = row * C;
  // λ = a·b / (b·b + eps) in fp64: for nearly parallel a, b an error δλ moves Δ = a − λb by δλ·|b| ≫ |Δ|·u.
  double ab_s = 0., bb_s = 0., ab_c = 0., bb_c = 0.;
  for (int64_t i = lane; i < C; i += kWarp) {
    const double xbs = to_f(bs[o + i]), xas = to_f(as[o + i]), xbc = to_f(bc[o + i]), xac = to_f(ac[o + i]);
    ab_s += xas * xbs;
    bb_s += xbs * xbs;
    ab_c += xac * xbc;
    bb_c += xbc * xbc;
  }
  ab_s = warp_sum(ab_s);
  bb_s = warp_sum(bb_s);
  ab_c = warp_sum(ab_c);
  bb_c = warp_sum(bb_c);
  const float Ds = static_cast<float>(bb_s + eps), Dc = static_cast<float>(bb_c + eps);
  const float ls = static_cast<float>(ab_s / (bb_s + eps)), lc = static_cast<float>(ab_c / (bb_c + eps));
  // (Δs·Δc, Δs·Δs, Δc·Δc)
  const auto [dd, ss, cc] = warp_row_dots(C, lane, [&](int64_t i) {
    return make_float2(to_f(as[o + i]) - ls * to_f(bs[o + i]), to_f(ac[o + i]) - lc * to_f(bc[o + i]));
  });
  if (lane == 0) {
    const float ns = sqrtf(ss), nc = sqrtf(cc);
    loss[row] = cosine_loss(dd, ns, nc);
    float* st = stats + row * kDeltaStats;
    st[0] = ls;
    st[1] = lc;
    st[2] = Ds;
    st[3] = Dc;
    st[4] = ns;
    st[5] = nc;
    st[6] = dd;
    st[7] = 0.f;
  }
}

template <typename T>
__global__ void delta_bwd_kernel(const float* __restrict__ grad, const T* __restrict__ bs, const T* __restrict__ as,
                                 const T* __restrict__ bc, const T* __restrict__ ac,
                                 const float* __restrict__ stats, T* g_bs, T* g_as, T* g_bc, T* g_ac, int64_t rows,
                                 int64_t C) {
  const auto [row, lane] = warp_row();
  if (row >= rows) return;
  const int64_t o = row * C;
  const float* st = stats + row * kDeltaStats;
  const float ls = st[0], lc = st[1], Ds = st[2], Dc = st[3], ns = st[4], nc = st[5], dd = st[6];
  const auto [alpha, beta_s, beta_c] = cosine_grad(grad[row], dd, ns, nc);
  float gb_s = 0.f, gb_c = 0.f;
  for (int64_t i = lane; i < C; i += kWarp) {
    const float xbs = to_f(bs[o + i]), xbc = to_f(bc[o + i]);
    const float ds = to_f(as[o + i]) - ls * xbs;
    const float dc = to_f(ac[o + i]) - lc * xbc;
    gb_s += (alpha * dc + beta_s * ds) * xbs;
    gb_c += (alpha * ds + beta_c * dc) * xbc;
  }
  const float rs = warp_sum(gb_s) / Ds, rc = warp_sum(gb_c) / Dc;
  for (int64_t i = lane; i < C; i += kWarp) {
    const float xbs = to_f(bs[o + i]), xas = to_f(as[o + i]), xbc = to_f(bc[o + i]), xac = to_f(ac[o + i]);
    const float ds = xas - ls * xbs, dc = xac - lc * xbc;
    const float Gs = alpha * dc + beta_s * ds, Gc = alpha * ds + beta_c * dc;
    if (g_as) g_as[o + i] = static_cast<T>(Gs - rs * xbs);
    if (g_bs) g_bs[o + i] = static_cast<T>(-ls * Gs - rs * xas + 2.f * ls * rs * xbs);
    if (g_ac) g_ac[o + i] = static_cast<T>(Gc - rc * xbc);
    if (g_bc) g_bc[o + i] = static_cast<T>(-lc * Gc - rc * xac + 2.f * lc * rc * xbc);
  }
}

// ------------------------------------------------------------------------------------------------
// soft warp tiles. Thread t owns rows {ty, ty + 16} × columns {tx, tx + 16} of a 32×32 tile.

struct TileIdx {
  int ty, tx;
  __device__ TileIdx() : ty(threadIdx.x / 16), tx(threadIdx.x % 16) {}
};

// acc[i][j] = Σ_d A[arow[ty + 16i] + d] · B[brow[tx + 16j] + d] over d < D (rows with offset -1 read as 0).
template <typename TA, typename TB>
__device__ void tile_dot(const TA* __restrict__ A, const int64_t* arow, const TB* __restrict__ Bm,
                         const int64_t* brow, int64_t D, float (*As)[kPad], float (*Bs)[kPad], float acc[2][2]) {
  const TileIdx t;
  acc[0][0] = acc[0][1] = acc[1][0] = acc[1][1] = 0.f;
  for (int64_t d0 = 0; d0 < D; d0 += kTile) {
    for (int idx = threadIdx.x; idx < kTile * kTile; idx += kThreads) {
      const int r = idx / kTile, c = idx % kTile;
      const bool in = d0 + c < D;
      As[r][c] = (in && arow[r] >= 0) ? to_f(A[arow[r] + d0 + c]) : 0.f;
      Bs[r][c] = (in && brow[r] >= 0) ? to_f(Bm[brow[r] + d0 + c]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kTile; ++c) {
      const float a0 = As[t.ty][c], a1 = As[t.ty + 16][c], b0 = Bs[t.tx][c], b1 = Bs[t.tx + 16][c];
      acc[0][0] += a0 * b0;
      acc[0][1] += a0 * b1;
      acc[1][0] += a1 * b0;
      acc[1][1] += a1 * b1;
    }
    __syncthreads();
  }
}

// Out[orow[r] + c] = Out[orow[r] + c]·rowscale[r] + Σ_k L(r, k)·R[rrow[k] + c] for c < W, in chunks of 32
// columns; L(r, k) = L[r][k], or L[k][r] when TRANS. `rowscale` may be null (1).
template <bool TRANS, typename TR>
__device__ void tile_accumulate(const float (*L)[kPad], const TR* __restrict__ R, const int64_t* rrow, int64_t W,
                                float* __restrict__ Out, const int64_t* orow, const float* rowscale,
                                float (*Rs)[kPad]) {
  const TileIdx t;
  for (int64_t c0 = 0; c0 < W; c0 += kTile) {
    for (int idx = threadIdx.x; idx < kTile * kTile; idx += kThreads) {
      const int k = idx / kTile, c = idx % kTile;
      Rs[k][c] = (rrow[k] >= 0 && c0 + c < W) ? to_f(R[rrow[k] + c0 + c]) : 0.f;
    }
    __syncthreads();
    float acc[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
#pragma unroll 8
    for (int k = 0; k < kTile; ++k) {
      const float l0 = TRANS ? L[k][t.ty] : L[t.ty][k];
      const float l1 = TRANS ? L[k][t.ty + 16] : L[t.ty + 16][k];
      const float r0 = Rs[k][t.tx], r1 = Rs[k][t.tx + 16];
      acc[0][0] += l0 * r0;
      acc[0][1] += l0 * r1;
      acc[1][0] += l1 * r0;
      acc[1][1] += l1 * r1;
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = t.ty + 16 * i;
      if (orow[r] < 0) continue;
      const float s = rowscale ? rowscale[r] : 1.f;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int64_t c = c0 + t.tx + 16 * j;
        if (c < W) {
          float* p = Out + orow[r] + c;
          *p = *p * s + acc[i][j];
        }
      }
    }
    __syncthreads();
  }
}

// Row n of a row tile of batch b: the (start + r)-th selected row, or -1 past the batch's count.
__device__ __forceinline__ int64_t tile_row(const int32_t* order, const int32_t* counts, int64_t b, int64_t N,
                                            int64_t start, int r) {
  const int64_t i = start + r;
  return i < counts[b] ? static_cast<int64_t>(order[b * N + i]) : -1;
}

// Tables of the key tile at k0 of batch b (threads < kTile, one key each): element offsets of its rows in
// k [B, M, Dq] and v [B, M, C], -1 past M. The caller synchronises before reading them.
__device__ __forceinline__ void load_key_tile(int64_t b, int64_t k0, int64_t M, int64_t Dq, int64_t C, int64_t* krow,
                                              int64_t* vrow) {
  if (threadIdx.x < kTile) {
    const int64_t j = k0 + threadIdx.x;
    krow[threadIdx.x] = j < M ? (b * M + j) * Dq : -1;
    vrow[threadIdx.x] = j < M ? (b * M + j) * C : -1;
  }
}

// Tables of the row tile at position `start` of batch b's selected rows (threads < kTile, one row each):
// element offsets of its rows in q [B, N, Dq] and in the [B, N, C] tensors, -1 past the selection; when given,
// the flat row index b·N + n (nrow), the saved lse2 (+inf past the selection) and D (0). The caller
// synchronises before reading them.
__device__ __forceinline__ void load_row_tile(const int32_t* order, const int32_t* counts, int64_t b, int64_t N,
                                              int64_t start, int64_t Dq, int64_t C, int64_t* qrow, int64_t* crow,
                                              int64_t* nrow, const float* lse, float* lse_s, const float* Dv,
                                              float* D_s) {
  if (threadIdx.x < kTile) {
    const int r = threadIdx.x;
    const int64_t n = tile_row(order, counts, b, N, start, r);
    qrow[r] = n < 0 ? -1 : (b * N + n) * Dq;
    crow[r] = n < 0 ? -1 : (b * N + n) * C;
    if (nrow) nrow[r] = n < 0 ? -1 : b * N + n;
    if (lse_s) lse_s[r] = n < 0 ? INFINITY : lse[b * N + n];
    if (D_s) D_s[r] = n < 0 ? 0.f : Dv[b * N + n];
  }
}

template <typename T>
__global__ void soft_warp_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ f,
                                     const T* __restrict__ v, const int32_t* __restrict__ order,
                                     const int32_t* __restrict__ counts, float* __restrict__ rows_out,
                                     float* __restrict__ lse, float* __restrict__ warped, int64_t N, int64_t M,
                                     int64_t Dq, int64_t C, float scale2) {
  __shared__ float As[kTile][kPad], Bs[kTile][kPad], Ps[kTile][kPad];
  __shared__ int64_t qrow[kTile], krow[kTile], vrow[kTile], orow[kTile], nrow[kTile];
  __shared__ float m_s[kTile], l_s[kTile], corr_s[kTile];
  const int64_t b = blockIdx.y, start = static_cast<int64_t>(blockIdx.x) * kTile;
  if (start >= counts[b]) return;  // uniform per block
  const TileIdx t;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  load_row_tile(order, counts, b, N, start, Dq, C, qrow, orow, nrow, nullptr, nullptr, nullptr, nullptr);
  if (threadIdx.x < kTile) {
    m_s[threadIdx.x] = -INFINITY;
    l_s[threadIdx.x] = 0.f;
  }
  __syncthreads();
  for (int64_t k0 = 0; k0 < M; k0 += kTile) {
    load_key_tile(b, k0, M, Dq, C, krow, vrow);
    __syncthreads();
    float acc[2][2];
    tile_dot(q, qrow, k, krow, Dq, As, Bs, acc);
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int c = t.tx + 16 * j;
        Ps[t.ty + 16 * i][c] = krow[c] >= 0 ? acc[i][j] * scale2 : -INFINITY;
      }
    __syncthreads();
    for (int r = warp; r < kTile; r += kThreads / kWarp) {  // online softmax, one warp per row
      const float s = Ps[r][lane];
      const float m_old = m_s[r];
      const float m_new = fmaxf(m_old, warp_max(s));
      const bool none = m_new == -INFINITY;
      const float p = none ? 0.f : exp2f(s - m_new);
      Ps[r][lane] = p;
      const float sum = warp_sum(p);
      if (lane == 0) {
        const float corr = none ? 1.f : exp2f(m_old - m_new);
        corr_s[r] = corr;
        l_s[r] = l_s[r] * corr + sum;
        m_s[r] = m_new;
      }
    }
    __syncthreads();
    tile_accumulate<false>(Ps, v, vrow, C, warped, orow, corr_s, Bs);
  }
  // epilogue: normalise, save lse, cosine with feat_subj (one warp per row)
  for (int r = warp; r < kTile; r += kThreads / kWarp) {
    if (nrow[r] < 0) continue;
    const float l = l_s[r];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    float* w = warped + orow[r];
    const T* fr = f + orow[r];
    const auto [wf, ww, ff] = warp_row_dots(C, lane, [&](int64_t c) {
      const float x = w[c] * inv;
      w[c] = x;
      return make_float2(x, to_f(fr[c]));
    });
    if (lane == 0) {
      rows_out[nrow[r]] = cosine_loss(wf, sqrtf(ww), sqrtf(ff));
      lse[nrow[r]] = l > 0.f ? m_s[r] + log2f(l) : -INFINITY;  // no keys: -inf, as the Triton kernel
    }
  }
}

// One warp per row: dW = g·d(1 − cos)/dw, D = dW·w, and d feat_subj (g_f may be null). Skips weight-0 rows.
template <typename T>
__global__ void soft_warp_rows_bwd_kernel(const float* __restrict__ grad, const float* __restrict__ weights,
                                          const T* __restrict__ f, const float* __restrict__ warped,
                                          float* __restrict__ dW, float* __restrict__ Dv, T* g_f, int64_t rows,
                                          int64_t C) {
  const auto [row, lane] = warp_row();
  if (row >= rows || weights[row] == 0.f) return;
  const int64_t o = row * C;
  const auto [wf, ww, ff] =
      warp_row_dots(C, lane, [&](int64_t c) { return make_float2(warped[o + c], to_f(f[o + c])); });
  const float sw = sqrtf(ww), sf = sqrtf(ff);
  const auto [alpha, beta_w, beta_f] = cosine_grad(grad[row], wf, sw, sf);
  float d = 0.f;
  for (int64_t c = lane; c < C; c += kWarp) {
    const float x = warped[o + c], y = to_f(f[o + c]);
    const float dw = alpha * y + beta_w * x;
    dW[o + c] = dw;
    d += dw * x;
    if (g_f) g_f[o + c] = static_cast<T>(alpha * x + beta_f * y);
  }
  d = warp_sum(d);
  if (lane == 0) Dv[row] = d;
}

// P = 2^(scale2·S − lse2) and dS = scale·P·(dP − D) of one tile, into Ps / dSs (rows past the selection, with
// lse2 = +inf in the table, and keys past M: 0).
__device__ __forceinline__ void probs_tile(const float acc_s[2][2], const float acc_dp[2][2], bool with_ds,
                                           const float* lse_s, const float* D_s, const int64_t* krow, float scale,
                                           float scale2, float (*Ps)[kPad], float (*dSs)[kPad]) {
  const TileIdx t;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int r = t.ty + 16 * i, c = t.tx + 16 * j;
      const float l = lse_s[r];
      const bool ok = krow[c] >= 0 && l != INFINITY;
      const float p = ok ? exp2f(acc_s[i][j] * scale2 - l) : 0.f;
      Ps[r][c] = p;
      if (with_ds) dSs[r][c] = scale * p * (acc_dp[i][j] - D_s[r]);
    }
}

// dQ of a tile of query rows (grid: row tiles × B), accumulated in fp32 dq (zero-initialised).
template <typename T>
__global__ void soft_warp_dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                    const float* __restrict__ dW, const float* __restrict__ Dv,
                                    const float* __restrict__ lse, const int32_t* __restrict__ order,
                                    const int32_t* __restrict__ counts, float* __restrict__ dq, int64_t N, int64_t M,
                                    int64_t Dq, int64_t C, float scale, float scale2) {
  __shared__ float As[kTile][kPad], Bs[kTile][kPad], Ps[kTile][kPad], dSs[kTile][kPad];
  __shared__ int64_t qrow[kTile], wrow[kTile], krow[kTile], vrow[kTile];
  __shared__ float lse_s[kTile], D_s[kTile];
  const int64_t b = blockIdx.y, start = static_cast<int64_t>(blockIdx.x) * kTile;
  if (start >= counts[b]) return;
  load_row_tile(order, counts, b, N, start, Dq, C, qrow, wrow, nullptr, lse, lse_s, Dv, D_s);
  __syncthreads();
  for (int64_t k0 = 0; k0 < M; k0 += kTile) {
    load_key_tile(b, k0, M, Dq, C, krow, vrow);
    __syncthreads();
    float acc_s[2][2], acc_dp[2][2];
    tile_dot(q, qrow, k, krow, Dq, As, Bs, acc_s);
    tile_dot(dW, wrow, v, vrow, C, As, Bs, acc_dp);
    probs_tile(acc_s, acc_dp, true, lse_s, D_s, krow, scale, scale2, Ps, dSs);
    __syncthreads();
    tile_accumulate<false>(dSs, k, krow, Dq, dq, qrow, nullptr, Bs);
  }
}

// dK and dV of a tile of keys (grid: key tiles × B), walking the batch's active query rows.
template <typename T>
__global__ void soft_warp_dkv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                     const float* __restrict__ dW, const float* __restrict__ Dv,
                                     const float* __restrict__ lse, const int32_t* __restrict__ order,
                                     const int32_t* __restrict__ counts, float* __restrict__ dk,
                                     float* __restrict__ dv, int64_t N, int64_t M, int64_t Dq, int64_t C,
                                     float scale, float scale2) {
  __shared__ float As[kTile][kPad], Bs[kTile][kPad], Ps[kTile][kPad], dSs[kTile][kPad];
  __shared__ int64_t qrow[kTile], wrow[kTile], krow[kTile], vrow[kTile];
  __shared__ float lse_s[kTile], D_s[kTile];
  const int64_t b = blockIdx.y, k0 = static_cast<int64_t>(blockIdx.x) * kTile;
  load_key_tile(b, k0, M, Dq, C, krow, vrow);
  const int64_t count = counts[b];
  const bool need_k = dk != nullptr;
  for (int64_t start = 0; start < count; start += kTile) {
    __syncthreads();  // the previous tile's readers of the row tables are done
    load_row_tile(order, counts, b, N, start, Dq, C, qrow, wrow, nullptr, lse, lse_s, Dv, D_s);
    __syncthreads();
    float acc_s[2][2], acc_dp[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
    tile_dot(q, qrow, k, krow, Dq, As, Bs, acc_s);
    if (need_k) tile_dot(dW, wrow, v, vrow, C, As, Bs, acc_dp);
    probs_tile(acc_s, acc_dp, need_k, lse_s, D_s, krow, scale, scale2, Ps, dSs);
    __syncthreads();
    if (dv) tile_accumulate<true>(Ps, dW, wrow, C, dv, vrow, nullptr, Bs);
    if (need_k) tile_accumulate<true>(dSs, q, qrow, Dq, dk, krow, nullptr, Bs);
  }
}

#define ADAFACE_DISPATCH_CUDA(TYPE, NAME, ...)                                       \
  switch (TYPE) {                                                                    \
    case at::kFloat: {                                                               \
      using scalar_t = float;                                                        \
      __VA_ARGS__();                                                                 \
      break;                                                                         \
    }                                                                                \
    case at::kHalf: {                                                                \
      using scalar_t = at::Half;                                                     \
      __VA_ARGS__();                                                                 \
      break;                                                                         \
    }                                                                                \
    case at::kBFloat16: {                                                            \
      using scalar_t = at::BFloat16;                                                 \
      __VA_ARGS__();                                                                 \
      break;                                                                         \
    }                                                                                \
    default:                                                                         \
      TORCH_CHECK(false, NAME, ": dtype must be float32, float16 or bfloat16, got ", TYPE); \
  }

unsigned int blocks_for(int64_t n, int64_t per_block) {
  const int64_t g = (n + per_block - 1) / per_block;
  TORCH_CHECK(g <= std::numeric_limits<int32_t>::max(), "adaface: too many rows for one launch");
  return static_cast<unsigned int>(g);
}

// The saved row selection (losses.h): each batch's selected rows (weight != 0) first, ascending, then the
// others (a stable sort, as the Triton backend's), and their counts, int32; on the device, no host sync.
std::tuple<at::Tensor, at::Tensor> compact_rows(const at::Tensor& weights) {
  const at::Tensor inactive = (weights == 0).to(at::kInt);
  const at::Tensor order = std::get<1>(at::sort(inactive, /*stable=*/true, /*dim=*/1, /*descending=*/false));
  const at::Tensor counts = (weights != 0).sum({1}, /*keepdim=*/false, at::kInt);
  return {order.to(at::kInt).contiguous(), counts.contiguous()};
}

constexpr float kLog2e = 1.44269504088896341f;

}  // namespace

std::tuple<at::Tensor, at::Tensor> delta_cosine_fwd_cuda(const at::Tensor& subj_single, const at::Tensor& subj_comp,
                                                         const at::Tensor& cls_single, const at::Tensor& cls_comp,
                                                         double eps) {
  check_delta_inputs(subj_single, subj_comp, cls_single, cls_comp);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(subj_single.device());
  const at::Tensor bs = subj_single.contiguous(), as = subj_comp.contiguous(), bc = cls_single.contiguous(),
                   ac = cls_comp.contiguous();
  const auto row_shape = subj_single.sizes().slice(0, subj_single.dim() - 1);
  at::Tensor loss = at::empty(row_shape, subj_single.options().dtype(at::kFloat));
  at::Tensor stats = at::empty({loss.numel(), kDeltaStats}, loss.options());
  const int64_t rows = loss.numel(), C = subj_single.size(-1);
  if (rows == 0) return {loss, stats};
  auto stream = c10::cuda::getCurrentCUDAStream();
  ADAFACE_DISPATCH_CUDA(bs.scalar_type(), "delta_cosine_ext_fwd", [&] {
    delta_fwd_kernel<scalar_t><<<blocks_for(rows, kRowsPerBlock), kThreads, 0, stream>>>(
        bs.const_data_ptr<scalar_t>(), as.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(),
        ac.const_data_ptr<scalar_t>(), loss.data_ptr<float>(), stats.data_ptr<float>(), rows, C,
        static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> delta_cosine_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& subj_single, const at::Tensor& subj_comp, const at::Tensor& cls_single,
    const at::Tensor& cls_comp, const at::Tensor& stats, double eps, at::IntArrayRef needs) {
  check_delta_inputs(subj_single, subj_comp, cls_single, cls_comp);
  (void)eps;  // D = b·b + eps is in the saved stats
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(subj_single.device());
  const at::Tensor bs = subj_single.contiguous(), as = subj_comp.contiguous(), bc = cls_single.contiguous(),
                   ac = cls_comp.contiguous();
  const at::Tensor g = grad.to(at::kFloat).contiguous(), st = stats.contiguous();
  at::Tensor out[4];
  for (int i = 0; i < 4; ++i) out[i] = need(needs, i) ? at::empty_like(bs) : at::empty({0}, bs.options());
  const int64_t rows = g.numel(), C = subj_single.size(-1);
  if (rows == 0 || !(need(needs, 0) || need(needs, 1) || need(needs, 2) || need(needs, 3)))
    return {out[0], out[1], out[2], out[3]};
  auto stream = c10::cuda::getCurrentCUDAStream();
  ADAFACE_DISPATCH_CUDA(bs.scalar_type(), "delta_cosine_ext_bwd", [&] {
    scalar_t* p[4];
    for (int i = 0; i < 4; ++i) p[i] = need(needs, i) ? out[i].data_ptr<scalar_t>() : nullptr;
    delta_bwd_kernel<scalar_t><<<blocks_for(rows, kRowsPerBlock), kThreads, 0, stream>>>(
        g.const_data_ptr<float>(), bs.const_data_ptr<scalar_t>(), as.const_data_ptr<scalar_t>(),
        bc.const_data_ptr<scalar_t>(), ac.const_data_ptr<scalar_t>(), st.const_data_ptr<float>(), p[0], p[1], p[2],
        p[3], rows, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out[0], out[1], out[2], out[3]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_warp_fwd_cuda(
    const at::Tensor& q_subj, const at::Tensor& q_comp, const at::Tensor& feat_subj, const at::Tensor& feat_comp,
    const at::Tensor& weights, double scale) {
  check_soft_warp_inputs(q_subj, q_comp, feat_subj, feat_comp, weights);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(q_subj.device());
  const int64_t B = q_subj.size(0), N = q_subj.size(1), Dq = q_subj.size(2), M = q_comp.size(1),
                C = feat_subj.size(2);
  TORCH_CHECK(B <= 65535, "soft_warp_ext_fwd: at most 65535 batches per call");
  const auto f32 = q_subj.options().dtype(at::kFloat);
  auto [order, counts] = compact_rows(weights.contiguous());
  // rows that are not selected: loss 0; their warped and lse entries are not part of the saved state (0 here)
  at::Tensor rows = at::zeros({B, N}, f32);
  at::Tensor lse = at::zeros({B, N}, f32);
  at::Tensor warped = at::zeros({B, N, C}, f32);
  if (B == 0 || N == 0) return {rows, warped, lse, order, counts};
  const at::Tensor q = q_subj.contiguous(), k = q_comp.contiguous(), f = feat_subj.contiguous(),
                   v = feat_comp.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(blocks_for(N, kTile), static_cast<unsigned int>(B));
  ADAFACE_DISPATCH_CUDA(q.scalar_type(), "soft_warp_ext_fwd", [&] {
    soft_warp_fwd_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(),
        v.const_data_ptr<scalar_t>(), order.const_data_ptr<int32_t>(), counts.const_data_ptr<int32_t>(),
        rows.data_ptr<float>(), lse.data_ptr<float>(), warped.data_ptr<float>(), N, M, Dq, C,
        static_cast<float>(scale) * kLog2e);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {rows, warped, lse, order, counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_warp_bwd_cuda(
    const at::Tensor& grad_rows, const at::Tensor& q_subj, const at::Tensor& q_comp, const at::Tensor& feat_subj,
    const at::Tensor& feat_comp, const at::Tensor& weights, const at::Tensor& warped, const at::Tensor& lse,
    const at::Tensor& order, const at::Tensor& count, double scale, bool need_qs, bool need_qc, bool need_fs,
    bool need_fc) {
  check_soft_warp_inputs(q_subj, q_comp, feat_subj, feat_comp, weights);
  check_saved_state(q_subj, feat_subj, grad_rows, warped, lse, order, count);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(q_subj.device());
  const int64_t B = q_subj.size(0), N = q_subj.size(1), Dq = q_subj.size(2), M = q_comp.size(1),
                C = feat_subj.size(2);
  const auto empty = at::empty({0}, q_subj.options());
  const auto f32 = q_subj.options().dtype(at::kFloat);
  at::Tensor g_f = need_fs ? at::zeros({B, N, C}, q_subj.options()) : empty;
  at::Tensor dq = need_qs ? at::zeros({B, N, Dq}, f32) : at::Tensor();
  at::Tensor dk = need_qc ? at::zeros({B, M, Dq}, f32) : at::Tensor();
  at::Tensor dv = need_fc ? at::zeros({B, M, C}, f32) : at::Tensor();
  if (B > 0 && N > 0 && (need_qs || need_qc || need_fs || need_fc)) {
    const at::Tensor q = q_subj.contiguous(), k = q_comp.contiguous(), f = feat_subj.contiguous(),
                     v = feat_comp.contiguous(), w = weights.contiguous(), g = grad_rows.to(at::kFloat).contiguous(),
                     wp = warped.contiguous(), ls = lse.contiguous(), ord = order.contiguous(),
                     counts = count.contiguous();
    at::Tensor dW = at::empty({B, N, C}, f32), Dv = at::empty({B, N}, f32);
    auto stream = c10::cuda::getCurrentCUDAStream();
    const float sc = static_cast<float>(scale), scale2 = sc * kLog2e;
    ADAFACE_DISPATCH_CUDA(q.scalar_type(), "soft_warp_ext_bwd", [&] {
      soft_warp_rows_bwd_kernel<scalar_t><<<blocks_for(B * N, kRowsPerBlock), kThreads, 0, stream>>>(
          g.const_data_ptr<float>(), w.const_data_ptr<float>(), f.const_data_ptr<scalar_t>(),
          wp.const_data_ptr<float>(), dW.data_ptr<float>(), Dv.data_ptr<float>(),
          need_fs ? g_f.data_ptr<scalar_t>() : nullptr, B * N, C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (M > 0 && need_qs) {
        const dim3 grid(blocks_for(N, kTile), static_cast<unsigned int>(B));
        soft_warp_dq_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
            q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
            dW.const_data_ptr<float>(), Dv.const_data_ptr<float>(), ls.const_data_ptr<float>(),
            ord.const_data_ptr<int32_t>(), counts.const_data_ptr<int32_t>(), dq.data_ptr<float>(), N, M, Dq, C, sc,
            scale2);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (M > 0 && (need_qc || need_fc)) {
        const dim3 grid(blocks_for(M, kTile), static_cast<unsigned int>(B));
        soft_warp_dkv_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
            q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
            dW.const_data_ptr<float>(), Dv.const_data_ptr<float>(), ls.const_data_ptr<float>(),
            ord.const_data_ptr<int32_t>(), counts.const_data_ptr<int32_t>(),
            need_qc ? dk.data_ptr<float>() : nullptr, need_fc ? dv.data_ptr<float>() : nullptr, N, M, Dq, C, sc,
            scale2);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  const auto dt = q_subj.scalar_type();
  return {need_qs ? dq.to(dt) : empty, need_qc ? dk.to(dt) : empty, g_f, need_fc ? dv.to(dt) : empty};
}

}  // namespace adaface

TORCH_LIBRARY_IMPL(adaface, CUDA, m) {
  m.impl("delta_cosine_ext_fwd", &adaface::delta_cosine_fwd_cuda);
  m.impl("delta_cosine_ext_bwd", &adaface::delta_cosine_bwd_cuda);
  m.impl("soft_warp_ext_fwd", &adaface::soft_warp_fwd_cuda);
  m.impl("soft_warp_ext_bwd", &adaface::soft_warp_bwd_cuda);
}
