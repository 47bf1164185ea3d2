// CPU kernels of the two losses and the registration of the `torch.ops.adaface.*_ext` ops (schemas here,
// CPU implementations here, CUDA implementations in losses_cuda.cu, fake/autograd in adaface/ops/_extension.py).
//
// Parallelism: at::parallel_for over rows (delta cosine) or over blocks of query rows (soft warp, forward and
// backward); this file is compiled with -fopenmp so at::parallel_for really forks (see setup.py). Inner loops
// run on contiguous fp32 rows with `omp simd` reductions, in avx512/avx2/baseline clones picked at load time;
// the soft warp's matrix products go through gemm_cpu.h (an AVX-512 micro-kernel, at::mm without AVX-512).
//
// Soft-warp work per (row block, key block): forward 2 matrix products (Sᵀ = K Qᵀ, O += P V), backward 5
// (Sᵀ recomputed, dPᵀ = V dWᵀ, dQ += dS K, dK += dSᵀ Q, dV += Pᵀ dW): one more than the eager reference,
// which keeps P ([B, N, M]) from its forward instead.
#include "losses.h"

#include "gemm_cpu.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && defined(__linux__)
#define ADAFACE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ADAFACE_CLONES
#endif

namespace adaface {

bool need(at::IntArrayRef needs, int64_t i) { return i < static_cast<int64_t>(needs.size()) && needs[i] != 0; }

void check_delta_inputs(const at::Tensor& subj_single, const at::Tensor& subj_comp, const at::Tensor& cls_single,
                        const at::Tensor& cls_comp) {
  TORCH_CHECK(subj_single.dim() >= 1, "delta_cosine_fwd_ext: inputs must be [..., C]");
  for (const at::Tensor* t : {&subj_comp, &cls_single, &cls_comp}) {
    TORCH_CHECK(t->sizes() == subj_single.sizes(), "delta_cosine_fwd_ext: all inputs must have one shape");
    TORCH_CHECK(t->scalar_type() == subj_single.scalar_type(), "delta_cosine_fwd_ext: all inputs must have one dtype");
    TORCH_CHECK(t->device() == subj_single.device(), "delta_cosine_fwd_ext: all inputs must be on one device");
  }
  const auto st = subj_single.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "delta_cosine_fwd_ext: dtype must be float32, float16 or bfloat16");
}

void check_soft_warp_inputs(const at::Tensor& q_subj, const at::Tensor& q_comp, const at::Tensor& feat_subj,
                            const at::Tensor& feat_comp, const at::Tensor& weights) {
  TORCH_CHECK(q_subj.dim() == 3 && q_comp.dim() == 3 && feat_subj.dim() == 3 && feat_comp.dim() == 3,
              "soft_warp_fwd_ext: inputs must be 3-D");
  const int64_t B = q_subj.size(0), N = q_subj.size(1), Dq = q_subj.size(2);
  const int64_t M = q_comp.size(1), C = feat_subj.size(2);
  TORCH_CHECK(q_comp.size(0) == B && q_comp.size(2) == Dq, "soft_warp_fwd_ext: q_comp must be [B, M, Dq]");
  TORCH_CHECK(feat_subj.size(0) == B && feat_subj.size(1) == N, "soft_warp_fwd_ext: feat_subj must be [B, N, C]");
  TORCH_CHECK(feat_comp.size(0) == B && feat_comp.size(1) == M && feat_comp.size(2) == C,
              "soft_warp_fwd_ext: feat_comp must be [B, M, C]");
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == B && weights.size(1) == N,
              "soft_warp_fwd_ext: weights must be [B, N]");
  TORCH_CHECK(weights.scalar_type() == at::kFloat, "soft_warp_fwd_ext: weights must be float32");
  for (const at::Tensor* t : {&q_comp, &feat_subj, &feat_comp}) {
    TORCH_CHECK(t->scalar_type() == q_subj.scalar_type(), "soft_warp_fwd_ext: inputs must have one dtype");
    TORCH_CHECK(t->device() == q_subj.device(), "soft_warp_fwd_ext: inputs must be on one device");
  }
  TORCH_CHECK(weights.device() == q_subj.device(), "soft_warp_fwd_ext: weights must be on the inputs' device");
  const auto st = q_subj.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "soft_warp_fwd_ext: dtype must be float32, float16 or bfloat16");
}

namespace {

// ------------------------------------------------------------------------------------------------
// Small fp32 row primitives (vectorised by the compiler; `omp simd` allows the reassociation).

ADAFACE_CLONES float dot(const float* x, const float* y, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i] * y[i];
  return s;
}

// exp for x <= ~88 (softmax arguments are <= 0): Cody-Waite reduction x = k·ln2 + r, |r| <= ln2/2, and a
// degree-7 Taylor polynomial (truncation error < 6e-9 relative); exp(-inf) and x < -87.3 give 0.
// Written with plain float/int ops so that it vectorises inside `omp simd` loops.
#pragma omp declare simd notinbranch
inline float exp_approx(float x) {
  const float xc = std::min(std::max(x, -87.3f), 88.0f);
  const float kf = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (xc - kf * 0.693145751953125f) - kf * 1.428606765330187e-06f;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(float));
  return x < -87.3f ? 0.f : p * two_k;
}

template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <>
inline void to_float<float>(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, sizeof(float) * n);
}

template <typename T>
inline void from_float(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// A row as fp32: the input itself when it is fp32, else a converted copy in `scratch`.
template <typename T>
inline const float* row_f32(const T* src, float* scratch, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    to_float(src, scratch, n);
    return scratch;
  }
}

// ------------------------------------------------------------------------------------------------
// delta cosine

struct DeltaRowFwd {
  float loss;
  float stats[kDeltaStats];
};

ADAFACE_CLONES DeltaRowFwd delta_row_fwd(const float* bs, const float* as, const float* bc, const float* ac,
                                         int64_t C, float eps) {
  // λ = a·b / (b·b + eps) in fp64: for nearly parallel a, b an error δλ moves Δ = a − λb by δλ·|b| ≫ |Δ|·u.
  double ab_s = 0., bb_s = 0., ab_c = 0., bb_c = 0.;
#pragma omp simd reduction(+ : ab_s, bb_s, ab_c, bb_c)
  for (int64_t i = 0; i < C; ++i) {
    ab_s += static_cast<double>(as[i]) * bs[i];
    bb_s += static_cast<double>(bs[i]) * bs[i];
    ab_c += static_cast<double>(ac[i]) * bc[i];
    bb_c += static_cast<double>(bc[i]) * bc[i];
  }
  const float Ds = static_cast<float>(bb_s + eps), Dc = static_cast<float>(bb_c + eps);
  const float ls = static_cast<float>(ab_s / (bb_s + eps)), lc = static_cast<float>(ab_c / (bb_c + eps));
  float dd = 0.f, ss = 0.f, cc = 0.f;
#pragma omp simd reduction(+ : dd, ss, cc)
  for (int64_t i = 0; i < C; ++i) {
    const float ds = as[i] - ls * bs[i];
    const float dc = ac[i] - lc * bc[i];
    dd += ds * dc;
    ss += ds * ds;
    cc += dc * dc;
  }
  const float ns = std::sqrt(ss), nc = std::sqrt(cc);
  const float ce = static_cast<float>(kCosineEps);
  const float cosv = dd / (std::max(ns, ce) * std::max(nc, ce));
  return {1.f - cosv, {ls, lc, Ds, Dc, ns, nc, dd, 0.f}};
}

// Gradients of one row; any output pointer may be null (not needed).
ADAFACE_CLONES void delta_row_bwd(float g, const float* st, const float* bs, const float* as, const float* bc,
                                  const float* ac, int64_t C, float* g_bs, float* g_as, float* g_bc, float* g_ac) {
  const float ls = st[0], lc = st[1], Ds = st[2], Dc = st[3], ns = st[4], nc = st[5], dd = st[6];
  const float ce = static_cast<float>(kCosineEps);
  const float n1 = std::max(ns, ce), n2 = std::max(nc, ce);
  // d(1 − cos)/dΔs = −Δc/(n1 n2) + (Δs·Δc)/(n1² n2)·Δs/|Δs|, as torch's autograd of cosine_similarity.
  const float alpha = -g / (n1 * n2);
  const float beta_s = ns > 0.f ? g * dd / (n1 * n1 * n2 * ns) : 0.f;
  const float beta_c = nc > 0.f ? g * dd / (n2 * n2 * n1 * nc) : 0.f;
  float gb_s = 0.f, gb_c = 0.f;
#pragma omp simd reduction(+ : gb_s, gb_c)
  for (int64_t i = 0; i < C; ++i) {
    const float ds = as[i] - ls * bs[i];
    const float dc = ac[i] - lc * bc[i];
    gb_s += (alpha * dc + beta_s * ds) * bs[i];
    gb_c += (alpha * ds + beta_c * dc) * bc[i];
  }
  const float rs = gb_s / Ds, rc = gb_c / Dc;
#pragma omp simd
  for (int64_t i = 0; i < C; ++i) {
    const float ds = as[i] - ls * bs[i];
    const float dc = ac[i] - lc * bc[i];
    const float Gs = alpha * dc + beta_s * ds;
    const float Gc = alpha * ds + beta_c * dc;
    if (g_as) g_as[i] = Gs - rs * bs[i];
    if (g_bs) g_bs[i] = -ls * Gs - rs * as[i] + 2.f * ls * rs * bs[i];
    if (g_ac) g_ac[i] = Gc - rc * bc[i];
    if (g_bc) g_bc[i] = -lc * Gc - rc * ac[i] + 2.f * lc * rc * bc[i];
  }
}

int64_t row_grain(int64_t C) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)); }

template <typename T>
void delta_fwd_impl(const at::Tensor& bs, const at::Tensor& as, const at::Tensor& bc, const at::Tensor& ac,
                    at::Tensor& loss, at::Tensor& stats, float eps) {
  const int64_t C = bs.size(-1), rows = loss.numel();
  const T* pbs = bs.const_data_ptr<T>();
  const T* pas = as.const_data_ptr<T>();
  const T* pbc = bc.const_data_ptr<T>();
  const T* pac = ac.const_data_ptr<T>();
  float* pl = loss.data_ptr<float>();
  float* pst = stats.data_ptr<float>();
  at::parallel_for(0, rows, row_grain(C), [&](int64_t r0, int64_t r1) {
    std::vector<float> scratch(std::is_same_v<T, float> ? 0 : 4 * C);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t o = r * C;
      const float* fbs = row_f32(pbs + o, scratch.data(), C);
      const float* fas = row_f32(pas + o, scratch.data() + C, C);
      const float* fbc = row_f32(pbc + o, scratch.data() + 2 * C, C);
      const float* fac = row_f32(pac + o, scratch.data() + 3 * C, C);
      const DeltaRowFwd res = delta_row_fwd(fbs, fas, fbc, fac, C, eps);
      pl[r] = res.loss;
      std::memcpy(pst + r * kDeltaStats, res.stats, sizeof(res.stats));
    }
  });
}

template <typename T>
void delta_bwd_impl(const at::Tensor& grad, const at::Tensor& bs, const at::Tensor& as, const at::Tensor& bc,
                    const at::Tensor& ac, const at::Tensor& stats, at::Tensor* outs[4]) {
  const int64_t C = bs.size(-1), rows = grad.numel();
  const T* pin[4] = {bs.const_data_ptr<T>(), as.const_data_ptr<T>(), bc.const_data_ptr<T>(), ac.const_data_ptr<T>()};
  T* pout[4];
  for (int k = 0; k < 4; ++k) pout[k] = outs[k] ? outs[k]->data_ptr<T>() : nullptr;
  const float* pg = grad.const_data_ptr<float>();
  const float* pst = stats.const_data_ptr<float>();
  at::parallel_for(0, rows, row_grain(C), [&](int64_t r0, int64_t r1) {
    std::vector<float> scratch(std::is_same_v<T, float> ? 4 * C : 8 * C);
    float* gbuf = scratch.data();
    float* ibuf = scratch.data() + 4 * C;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t o = r * C;
      const float* f[4];
      for (int k = 0; k < 4; ++k) f[k] = row_f32(pin[k] + o, ibuf + k * C, C);
      float* go[4];
      for (int k = 0; k < 4; ++k) {
        if constexpr (std::is_same_v<T, float>) {
          go[k] = pout[k] ? pout[k] + o : nullptr;
        } else {
          go[k] = pout[k] ? gbuf + k * C : nullptr;
        }
      }
      delta_row_bwd(pg[r], pst + r * kDeltaStats, f[0], f[1], f[2], f[3], C, go[0], go[1], go[2], go[3]);
      if constexpr (!std::is_same_v<T, float>) {
        for (int k = 0; k < 4; ++k)
          if (pout[k]) from_float(go[k], pout[k] + o, C);
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------
// soft warp

// Layout: a task owns a block of active query rows (kRowBlock forward, kRowBlockBwd backward) and walks the
// keys in blocks of kKeyBlock. Logits are held transposed, St[key j][row i] (rows contiguous), so every step is
// a GEMM of gemm_cpu.h whose B operand has contiguous rows (Qᵀ, dWᵀ, V, K, Q, dW) and the softmax statistics of
// a row are lanes of a vector. Scratch per worker at Dq = C = 320: about 0.5 MB forward, 1.1 MB backward.
constexpr int64_t kRowBlock = 64;      // query rows per forward task (a GEMM's n or m)
constexpr int64_t kRowBlockBwd = 128;  // per backward task: the dK/dV GEMMs' depth, so C is reloaded less often
constexpr int64_t kKeyBlock = 256;     // keys per step (a GEMM's m or k)

// Active (weight != 0) rows of each batch, concatenated; offsets[b] .. offsets[b + 1].
struct ActiveRows {
  std::vector<int64_t> idx, offsets;
};

ActiveRows active_rows(const at::Tensor& weights) {
  const int64_t B = weights.size(0), N = weights.size(1);
  const at::Tensor w = weights.contiguous();
  const float* pw = w.const_data_ptr<float>();
  ActiveRows a;
  a.offsets.assign(B + 1, 0);
  a.idx.reserve(B * N);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t n = 0; n < N; ++n)
      if (pw[b * N + n] != 0.f) a.idx.push_back(b * N + n);  // flat row index b·N + n
    a.offsets[b + 1] = static_cast<int64_t>(a.idx.size());
  }
  return a;
}

struct RowBlock {
  int64_t b, begin, count, rank;  // rows a.idx[begin .. begin + count) of batch b, its rank-th block
};

std::vector<RowBlock> row_blocks(const ActiveRows& a, int64_t rows) {
  std::vector<RowBlock> blocks;
  for (size_t b = 0; b + 1 < a.offsets.size(); ++b)
    for (int64_t s = a.offsets[b], r = 0; s < a.offsets[b + 1]; s += rows, ++r)
      blocks.push_back({static_cast<int64_t>(b), s, std::min(rows, a.offsets[b + 1] - s), r});
  return blocks;
}

// Round-robin over batches (b0 r0, b1 r0, b0 r1, ...): tasks running at the same time are then mostly of
// different batches, whose dK/dV blocks (and locks) are disjoint.
std::vector<RowBlock> interleave_batches(const std::vector<RowBlock>& blocks, int64_t B) {
  std::vector<std::vector<RowBlock>> per(B);
  for (const RowBlock& blk : blocks) per[blk.b].push_back(blk);
  std::vector<RowBlock> out;
  out.reserve(blocks.size());
  for (size_t r = 0; out.size() < blocks.size(); ++r)
    for (int64_t b = 0; b < B; ++b)
      if (r < per[b].size()) out.push_back(per[b][r]);
  return out;
}

// Tasks handed out one at a time from a shared counter (not pre-split per thread): a thread that is
// descheduled on a shared machine does not hold back a fixed half of the work. `per_worker(w, fetch)` runs
// once per worker w < workers (scratch slice w is its own) and loops `for (t = fetch(); t < n; t = fetch())`.
int64_t worker_count(int64_t n_tasks) { return std::max<int64_t>(1, std::min<int64_t>(n_tasks, at::get_num_threads())); }

template <typename F>
void dynamic_for(int64_t n, const F& per_worker) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const auto fetch = [&next]() { return next.fetch_add(1, std::memory_order_relaxed); };
  const int64_t workers = worker_count(n);
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) per_worker(w, fetch);
  });
}

// Carves one worker's scratch slice into consecutive arrays.
struct Arena {
  float* p;
  float* end;
  float* take(int64_t n) {
    TORCH_INTERNAL_ASSERT(n <= end - p, "soft warp: a worker's scratch slice is smaller than its arrays");
    float* r = p;
    p += n;
    return r;
  }
};

// Worker w's slice (row w) of a scratch tensor from scratch_for.
Arena worker_arena(const at::Tensor& scratch, int64_t w) {
  float* base = scratch.data_ptr<float>() + w * scratch.size(1);
  return {base, base + scratch.size(1)};
}

// Scratch for all workers as one tensor allocated by the calling thread, so it shows in torch's memory
// accounting (profiler, benchmarks) like any other allocation of the op.
at::Tensor scratch_for(int64_t workers, int64_t floats_per_worker) {
  return at::empty({workers, floats_per_worker}, at::TensorOptions().dtype(at::kFloat));
}

// dst[p·cnt + r] = src[idx[r]·width + p]: rows idx of src, transposed (fp32)
template <typename T>
void gather_rows_t(const T* src, const int64_t* idx, int64_t cnt, int64_t width, float* dst) {
  for (int64_t r = 0; r < cnt; ++r) {
    const T* row = src + idx[r] * width;
    for (int64_t p = 0; p < width; ++p) dst[p * cnt + r] = static_cast<float>(row[p]);
  }
}

template <typename T>
void gather_rows(const T* src, const int64_t* idx, int64_t count, int64_t width, float* dst) {
  for (int64_t r = 0; r < count; ++r) to_float(src + idx[r] * width, dst + r * width, width);
}

// Online-softmax update for one key block of transposed logits St [kb, cnt] (in place → unnormalised
// probabilities): m, l = running max and sum per row; O [cnt, C] rows rescaled by exp(m_old − m_new).
// A row whose logits are all -inf so far keeps m = -inf: its exponent is taken against 0, giving p = 0.
ADAFACE_CLONES void online_softmax_cols(float* St, int64_t kb, int64_t cnt, float scale, float* m, float* l,
                                        float* O, int64_t C, float* m_new, float* sum) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < cnt; ++i) {
    m_new[i] = m[i];
    sum[i] = 0.f;
  }
  for (int64_t j = 0; j < kb; ++j) {
    float* s = St + j * cnt;
#pragma omp simd
    for (int64_t i = 0; i < cnt; ++i) {
      s[i] *= scale;
      m_new[i] = std::max(m_new[i], s[i]);
    }
  }
  for (int64_t i = 0; i < cnt; ++i) m_new[i] = m_new[i] == kNegInf ? 0.f : m_new[i];  // safe exponent base
  for (int64_t j = 0; j < kb; ++j) {
    float* s = St + j * cnt;
#pragma omp simd
    for (int64_t i = 0; i < cnt; ++i) {
      const float p = exp_approx(s[i] - m_new[i]);
      s[i] = p;
      sum[i] += p;
    }
  }
  for (int64_t i = 0; i < cnt; ++i) {
    const float corr = exp_approx(m[i] - m_new[i]);  // m = -inf (first block): 0, and O, l are still 0
    l[i] = l[i] * corr + sum[i];
    m[i] = m_new[i];
    if (corr != 1.f) {
      float* o = O + i * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o[c] *= corr;
    }
  }
}

// Transposed P = exp(scale·St − lse) in place; dSt = scale·P·(dPt − D) in place of dPt (when given).
// lse = +inf (a row with no probabilities) gives P = 0.
ADAFACE_CLONES void probs_and_dlogits_cols(float* St, float* dPt, int64_t kb, int64_t cnt, float scale,
                                           const float* lse, const float* D, float* lse_safe, float* live) {
  for (int64_t i = 0; i < cnt; ++i) {
    live[i] = std::isinf(lse[i]) ? 0.f : 1.f;
    lse_safe[i] = std::isinf(lse[i]) ? 0.f : lse[i];
  }
  for (int64_t j = 0; j < kb; ++j) {
    float* s = St + j * cnt;
#pragma omp simd
    for (int64_t i = 0; i < cnt; ++i) s[i] = live[i] * exp_approx(scale * s[i] - lse_safe[i]);
    if (dPt) {
      float* dp = dPt + j * cnt;
#pragma omp simd
      for (int64_t i = 0; i < cnt; ++i) dp[i] = scale * s[i] * (dp[i] - D[i]);
    }
  }
}

template <typename T>
void soft_warp_fwd_impl(const at::Tensor& q, const at::Tensor& k32, const at::Tensor& f, const at::Tensor& v32,
                        const ActiveRows& act, float scale, at::Tensor& rows_out, at::Tensor& lse,
                        at::Tensor& warped) {
  const int64_t Dq = q.size(2), M = k32.size(1), C = f.size(2);
  const T* pq = q.const_data_ptr<T>();
  const T* pf = f.const_data_ptr<T>();
  const float* pk = k32.const_data_ptr<float>();
  const float* pv = v32.const_data_ptr<float>();
  float* prow = rows_out.data_ptr<float>();
  float* plse = lse.data_ptr<float>();
  float* pw = warped.data_ptr<float>();
  const std::vector<RowBlock> blocks = row_blocks(act, kRowBlock);
  const int64_t n_tasks = static_cast<int64_t>(blocks.size());
  const int64_t R = kRowBlock, KB = kKeyBlock;
  const int64_t per_worker = Dq * R + KB * R + R * C + 4 * R + C;
  at::Tensor scratch = scratch_for(worker_count(n_tasks), per_worker);
  dynamic_for(n_tasks, [&](int64_t w, const auto& fetch) {
    Arena arena = worker_arena(scratch, w);
    float *Qt = arena.take(Dq * R), *St = arena.take(KB * R), *O = arena.take(R * C), *m = arena.take(R),
          *l = arena.take(R), *m_new = arena.take(R), *sum = arena.take(R), *frow = arena.take(C);
    for (int64_t t = fetch(); t < n_tasks; t = fetch()) {
      const RowBlock& blk = blocks[t];
      const int64_t cnt = blk.count;
      const int64_t* idx = act.idx.data() + blk.begin;
      gather_rows_t(pq, idx, cnt, Dq, Qt);
      std::fill(m, m + cnt, -std::numeric_limits<float>::infinity());
      std::fill(l, l + cnt, 0.f);
      std::fill(O, O + cnt * C, 0.f);
      const float* kb_all = pk + blk.b * M * Dq;
      const float* vb_all = pv + blk.b * M * C;
      for (int64_t j0 = 0; j0 < M; j0 += KB) {
        const int64_t kb = std::min(KB, M - j0);
        cpu::gemm_f32(kb, cnt, Dq, kb_all + j0 * Dq, Dq, 1, Qt, cnt, St, cnt, false);  // Sᵀ = K_j Qᵀ
        online_softmax_cols(St, kb, cnt, scale, m, l, O, C, m_new, sum);
        cpu::gemm_f32(cnt, C, kb, St, 1, cnt, vb_all + j0 * C, C, O, C, true);  // O += P V_j
      }
      for (int64_t r = 0; r < cnt; ++r) {
        const int64_t row = idx[r];
        float* wr = pw + row * C;
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        for (int64_t c = 0; c < C; ++c) wr[c] = O[r * C + c] * inv;
        plse[row] = l[r] > 0.f ? m[r] + std::log(l[r]) : std::numeric_limits<float>::infinity();
        const float* fr = row_f32(pf + row * C, frow, C);
        const float ce = static_cast<float>(kCosineEps);
        const float nw = std::sqrt(dot(wr, wr, C)), nf = std::sqrt(dot(fr, fr, C));
        prow[row] = 1.f - dot(wr, fr, C) / (std::max(nw, ce) * std::max(nf, ce));
      }
    }
  });
}

// Per row of a task: dW = g·d(1 − cos)/dw (into dw), returns D = dW·w; the gradient of feat_subj into gf.
ADAFACE_CLONES float cosine_row_grads(float g, const float* w, const float* fr, int64_t C, float* dw, float* gf) {
  const float ce = static_cast<float>(kCosineEps);
  const float sw = std::sqrt(dot(w, w, C)), sf = std::sqrt(dot(fr, fr, C)), wf = dot(w, fr, C);
  const float n1 = std::max(sw, ce), n2 = std::max(sf, ce);
  const float alpha = -g / (n1 * n2);
  const float beta_w = sw > 0.f ? g * wf / (n1 * n1 * n2 * sw) : 0.f;
  const float beta_f = sf > 0.f ? g * wf / (n2 * n2 * n1 * sf) : 0.f;
  float d = 0.f;
#pragma omp simd reduction(+ : d)
  for (int64_t c = 0; c < C; ++c) {
    dw[c] = alpha * fr[c] + beta_w * w[c];
    d += dw[c] * w[c];
  }
  if (gf) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) gf[c] = alpha * w[c] + beta_f * fr[c];
  }
  return d;
}

// Backward. Tasks are row blocks (as in the forward). A task first turns its rows' loss gradients into dW
// (and the feat_subj gradient), then walks every key block, starting at a different one per task so that
// concurrent tasks of one batch rarely want the same block. dQ rows have one owner (the task); dK/dV rows of
// a key block are shared by all tasks of the batch and updated under that block's locks.
template <typename T>
void soft_warp_bwd_impl(const at::Tensor& q32, const at::Tensor& k32, const at::Tensor& v32, const at::Tensor& f,
                        const at::Tensor& warped, const at::Tensor& lse, const at::Tensor& grad_rows,
                        const ActiveRows& act, float scale, bool need_q, bool need_k, bool need_v, T* g_f,
                        at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t B = q32.size(0), Dq = q32.size(2), M = k32.size(1), C = v32.size(2);
  const int64_t key_blocks = (M + kKeyBlock - 1) / kKeyBlock;
  const float* pq = q32.const_data_ptr<float>();
  const float* pk = k32.const_data_ptr<float>();
  const float* pv = v32.const_data_ptr<float>();
  const T* pf = f.const_data_ptr<T>();
  const float* pw = warped.const_data_ptr<float>();
  const float* plse = lse.const_data_ptr<float>();
  const float* pg = grad_rows.const_data_ptr<float>();
  float* pdq = need_q ? dq.data_ptr<float>() : nullptr;
  float* pdk = need_k ? dk.data_ptr<float>() : nullptr;
  float* pdv = need_v ? dv.data_ptr<float>() : nullptr;
  const bool need_dp = need_q || need_k;
  const bool need_attn = (need_q || need_k || need_v) && M > 0;
  // locks[2·(b·key_blocks + kblk) + {0: dK, 1: dV}]
  std::unique_ptr<std::mutex[]> locks(new std::mutex[std::max<int64_t>(2 * B * key_blocks, 1)]);
  const std::vector<RowBlock> blocks = interleave_batches(row_blocks(act, kRowBlockBwd), B);
  const int64_t n_tasks = static_cast<int64_t>(blocks.size());
  const int64_t R = kRowBlockBwd, KB = kKeyBlock;
  const int64_t per_worker = 3 * R * Dq + 2 * R * C + 2 * KB * R + 4 * R + 2 * C;
  at::Tensor scratch = scratch_for(worker_count(n_tasks), per_worker);
  dynamic_for(n_tasks, [&](int64_t w, const auto& fetch) {
    Arena arena = worker_arena(scratch, w);
    float *Qa = arena.take(R * Dq), *Qt = arena.take(Dq * R), *dQa = arena.take(R * Dq), *Wa = arena.take(R * C),
          *Wt = arena.take(C * R), *St = arena.take(KB * R), *dSt = arena.take(KB * R), *la = arena.take(R),
          *Da = arena.take(R), *lse_safe = arena.take(R), *live = arena.take(R), *frow = arena.take(C),
          *gf = arena.take(C);
    for (int64_t t = fetch(); t < n_tasks; t = fetch()) {
      const RowBlock& blk = blocks[t];
      const int64_t b = blk.b, cnt = blk.count;
      const int64_t* idx = act.idx.data() + blk.begin;
      for (int64_t r = 0; r < cnt; ++r) {
        const int64_t row = idx[r];
        const float* fr = row_f32(pf + row * C, frow, C);
        Da[r] = cosine_row_grads(pg[row], pw + row * C, fr, C, Wa + r * C, g_f ? gf : nullptr);
        if (g_f) from_float(gf, g_f + row * C, C);
        la[r] = plse[row];
      }
      if (!need_attn) continue;
      gather_rows_t(pq, idx, cnt, Dq, Qt);
      if (need_k) gather_rows(pq, idx, cnt, Dq, Qa);
      if (need_dp)
        for (int64_t r = 0; r < cnt; ++r)
          for (int64_t c = 0; c < C; ++c) Wt[c * cnt + r] = Wa[r * C + c];
      if (need_q) std::fill(dQa, dQa + cnt * Dq, 0.f);
      const int64_t first = blk.rank % key_blocks;  // staggered start within the batch
      for (int64_t step = 0; step < key_blocks; ++step) {
        const int64_t kblk = (first + step) % key_blocks;
        const int64_t j0 = kblk * KB, kb = std::min(KB, M - j0);
        const float* Kj = pk + (b * M + j0) * Dq;
        const float* Vj = pv + (b * M + j0) * C;
        cpu::gemm_f32(kb, cnt, Dq, Kj, Dq, 1, Qt, cnt, St, cnt, false);           // Sᵀ = K_j Qᵀ
        if (need_dp) cpu::gemm_f32(kb, cnt, C, Vj, C, 1, Wt, cnt, dSt, cnt, false);  // dPᵀ = V_j dWᵀ
        probs_and_dlogits_cols(St, need_dp ? dSt : nullptr, kb, cnt, scale, la, Da, lse_safe, live);
        if (need_q) cpu::gemm_f32(cnt, Dq, kb, dSt, 1, cnt, Kj, Dq, dQa, Dq, true);  // dQ += dS K_j
        std::mutex* lk = &locks[2 * (b * key_blocks + kblk)];
        if (need_v) {
          const std::lock_guard<std::mutex> guard(lk[1]);
          cpu::gemm_f32(kb, C, cnt, St, cnt, 1, Wa, C, pdv + (b * M + j0) * C, C, true);  // dV_j += Pᵀ dW
        }
        if (need_k) {
          const std::lock_guard<std::mutex> guard(lk[0]);
          cpu::gemm_f32(kb, Dq, cnt, dSt, cnt, 1, Qa, Dq, pdk + (b * M + j0) * Dq, Dq, true);  // dK_j += dSᵀ Q
        }
      }
      if (need_q)
        for (int64_t r = 0; r < cnt; ++r) std::memcpy(pdq + idx[r] * Dq, dQa + r * Dq, sizeof(float) * Dq);
    }
  });
}

// detach(): the OpenMP workers do not inherit the caller's autograd-exclusion guard.
at::Tensor as_f32(const at::Tensor& t) { return t.detach().to(at::kFloat).contiguous(); }

}  // namespace

// ------------------------------------------------------------------------------------------------
// Op entry points (CPU)

std::tuple<at::Tensor, at::Tensor> delta_cosine_fwd_cpu(const at::Tensor& subj_single, const at::Tensor& subj_comp,
                                                        const at::Tensor& cls_single, const at::Tensor& cls_comp,
                                                        double eps) {
  check_delta_inputs(subj_single, subj_comp, cls_single, cls_comp);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls below are not differentiated
  const at::Tensor bs = subj_single.contiguous(), as = subj_comp.contiguous(), bc = cls_single.contiguous(),
                   ac = cls_comp.contiguous();
  const auto row_shape = subj_single.sizes().slice(0, subj_single.dim() - 1);
  at::Tensor loss = at::empty(row_shape, subj_single.options().dtype(at::kFloat));
  at::Tensor stats = at::empty({loss.numel(), kDeltaStats}, loss.options());
  if (loss.numel() == 0) return {loss, stats};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bs.scalar_type(), "delta_cosine_fwd_cpu", [&] {
    delta_fwd_impl<scalar_t>(bs, as, bc, ac, loss, stats, static_cast<float>(eps));
  });
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> delta_cosine_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& subj_single, const at::Tensor& subj_comp, const at::Tensor& cls_single,
    const at::Tensor& cls_comp, const at::Tensor& stats, double eps, at::IntArrayRef needs) {
  check_delta_inputs(subj_single, subj_comp, cls_single, cls_comp);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls below are not differentiated
  (void)eps;  // D = b·b + eps is in the saved stats
  const at::Tensor bs = subj_single.contiguous(), as = subj_comp.contiguous(), bc = cls_single.contiguous(),
                   ac = cls_comp.contiguous();
  const at::Tensor g = grad.to(at::kFloat).contiguous(), st = stats.contiguous();
  at::Tensor out[4];
  at::Tensor* outs[4];
  for (int k = 0; k < 4; ++k) {
    out[k] = need(needs, k) ? at::empty_like(bs) : at::empty({0}, bs.options());
    outs[k] = need(needs, k) ? &out[k] : nullptr;
  }
  if (g.numel() > 0 && (outs[0] || outs[1] || outs[2] || outs[3])) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bs.scalar_type(), "delta_cosine_bwd_cpu", [&] {
      delta_bwd_impl<scalar_t>(g, bs, as, bc, ac, st, outs);
    });
  }
  return {out[0], out[1], out[2], out[3]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_warp_fwd_cpu(const at::Tensor& q_subj, const at::Tensor& q_comp,
                                                                 const at::Tensor& feat_subj,
                                                                 const at::Tensor& feat_comp,
                                                                 const at::Tensor& weights, double scale) {
  check_soft_warp_inputs(q_subj, q_comp, feat_subj, feat_comp, weights);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls below are not differentiated
  const int64_t B = q_subj.size(0), N = q_subj.size(1), C = feat_subj.size(2);
  const auto f32 = q_subj.options().dtype(at::kFloat);
  at::Tensor rows = at::zeros({B, N}, f32);
  at::Tensor lse = at::full({B, N}, std::numeric_limits<float>::infinity(), f32);
  at::Tensor warped = at::zeros({B, N, C}, f32);
  const ActiveRows act = active_rows(weights);
  if (act.idx.empty()) return {rows, lse, warped};
  const at::Tensor q = q_subj.contiguous(), f = feat_subj.contiguous();
  const at::Tensor k32 = as_f32(q_comp), v32 = as_f32(feat_comp);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "soft_warp_fwd_cpu", [&] {
    soft_warp_fwd_impl<scalar_t>(q, k32, f, v32, act, static_cast<float>(scale), rows, lse, warped);
  });
  return {rows, lse, warped};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_warp_bwd_cpu(
    const at::Tensor& grad_rows, const at::Tensor& q_subj, const at::Tensor& q_comp, const at::Tensor& feat_subj,
    const at::Tensor& feat_comp, const at::Tensor& weights, const at::Tensor& lse, const at::Tensor& warped,
    double scale, at::IntArrayRef needs) {
  check_soft_warp_inputs(q_subj, q_comp, feat_subj, feat_comp, weights);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls below are not differentiated
  const int64_t B = q_subj.size(0), N = q_subj.size(1), Dq = q_subj.size(2), M = q_comp.size(1),
                C = feat_subj.size(2);
  const bool nq = need(needs, 0), nk = need(needs, 1), nf = need(needs, 2), nv = need(needs, 3);
  const auto empty = at::empty({0}, q_subj.options());
  at::Tensor g_f = nf ? at::zeros_like(feat_subj, at::MemoryFormat::Contiguous) : empty;
  const ActiveRows act = active_rows(weights);
  const auto f32 = q_subj.options().dtype(at::kFloat);
  at::Tensor dq32, dk32, dv32;
  if (nk) dk32 = at::zeros({B, M, Dq}, f32);
  if (nv) dv32 = at::zeros({B, M, C}, f32);
  if (nq) dq32 = at::zeros({B, N, Dq}, f32);
  if (!act.idx.empty() && (nq || nk || nf || nv)) {
    const at::Tensor g = grad_rows.to(at::kFloat).contiguous(), w = warped.contiguous(), f = feat_subj.contiguous();
    // fp32 views of the attention inputs (free for fp32 inputs; converted copies otherwise)
    const at::Tensor q32 = as_f32(q_subj), k32 = as_f32(q_comp), v32 = as_f32(feat_comp);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "soft_warp_bwd_cpu", [&] {
      soft_warp_bwd_impl<scalar_t>(q32, k32, v32, f, w, lse.contiguous(), g, act, static_cast<float>(scale), nq, nk,
                                   nv, nf ? g_f.data_ptr<scalar_t>() : nullptr,
                                   dq32, dk32, dv32);
    });
  }
  at::Tensor g_q = nq ? dq32.to(q_subj.scalar_type()) : empty;
  at::Tensor g_k = nk ? dk32.to(q_subj.scalar_type()) : empty;
  at::Tensor g_v = nv ? dv32.to(q_subj.scalar_type()) : empty;
  return {g_q, g_k, g_f, g_v};
}

}  // namespace adaface

// ------------------------------------------------------------------------------------------------
// Registration. FRAGMENT: Python also defines `adaface::*` ops (the Triton ones) in this namespace.
TORCH_LIBRARY_FRAGMENT(adaface, m) {
  m.def("delta_cosine_fwd_ext(Tensor subj_single, Tensor subj_comp, Tensor cls_single, Tensor cls_comp, float eps)"
        " -> (Tensor, Tensor)");
  m.def("delta_cosine_bwd_ext(Tensor grad, Tensor subj_single, Tensor subj_comp, Tensor cls_single, "
        "Tensor cls_comp, Tensor stats, float eps, int[] needs) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("soft_warp_fwd_ext(Tensor q_subj, Tensor q_comp, Tensor feat_subj, Tensor feat_comp, Tensor weights, "
        "float scale) -> (Tensor, Tensor, Tensor)");
  m.def("soft_warp_bwd_ext(Tensor grad_rows, Tensor q_subj, Tensor q_comp, Tensor feat_subj, Tensor feat_comp, "
        "Tensor weights, Tensor lse, Tensor warped, float scale, int[] needs) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(adaface, CPU, m) {
  m.impl("delta_cosine_fwd_ext", &adaface::delta_cosine_fwd_cpu);
  m.impl("delta_cosine_bwd_ext", &adaface::delta_cosine_bwd_cpu);
  m.impl("soft_warp_fwd_ext", &adaface::soft_warp_fwd_cpu);
  m.impl("soft_warp_bwd_ext", &adaface::soft_warp_bwd_cpu);
}
