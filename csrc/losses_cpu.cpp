// CPU kernels of the two losses and the registration of the `torch.ops.adaface.*_ext` ops (schemas here,
// CPU implementations here, CUDA implementations in losses_cuda.cu, fake/autograd in adaface/ops/_extension.py).
//
// Parallelism: at::parallel_for over rows (delta cosine) or over blocks of query rows / key ranges (soft warp);
// this file is compiled with -fopenmp so at::parallel_for really forks (see setup.py). Inner loops run on
// contiguous fp32 rows with `omp simd` reductions, in avx512/avx2/baseline clones picked at load time.
#include "losses.h"

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

constexpr int64_t kRowBlock = 64;   // query rows processed together (GEMM M dimension)
constexpr int64_t kKeyBlock = 256;  // keys per step of the online softmax (GEMM N dimension)

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
  int64_t b, begin, count;  // rows a.idx[begin .. begin + count) of batch b
};

std::vector<RowBlock> row_blocks(const ActiveRows& a) {
  std::vector<RowBlock> blocks;
  for (size_t b = 0; b + 1 < a.offsets.size(); ++b)
    for (int64_t s = a.offsets[b]; s < a.offsets[b + 1]; s += kRowBlock)
      blocks.push_back({static_cast<int64_t>(b), s, std::min(kRowBlock, a.offsets[b + 1] - s)});
  return blocks;
}

// Tasks handed out one at a time from a shared counter (not pre-split per thread): a thread that is
// descheduled on a shared machine does not hold back a fixed half of the work. `per_thread(fetch)` runs once
// per worker (allocate scratch there) and loops `for (t = fetch(); t < n; t = fetch())`.
template <typename F>
void dynamic_for(int64_t n, const F& per_thread) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const auto fetch = [&next]() { return next.fetch_add(1, std::memory_order_relaxed); };
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) per_thread(fetch);
  });
}

at::Tensor blob(float* p, int64_t r, int64_t c) {
  return at::from_blob(p, {r, c}, at::TensorOptions().dtype(at::kFloat));
}

// Online-softmax update of `rows` rows of logits S [rows, kb] (in place → unnormalised probabilities):
// m, l: running max and sum; O [rows, C] rescaled by exp(m_old − m_new).
ADAFACE_CLONES void online_softmax_step(float* S, int64_t rows, int64_t kb, float scale, float* m, float* l, float* O,
                                        int64_t C) {
  for (int64_t r = 0; r < rows; ++r) {
    float* s = S + r * kb;
    float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < kb; ++j) {
      s[j] *= scale;
      mx = std::max(mx, s[j]);
    }
    const float m_new = std::max(m[r], mx);
    if (m_new == -std::numeric_limits<float>::infinity()) {  // every logit so far is -inf
      std::fill(s, s + kb, 0.f);
      continue;
    }
    const float corr = exp_approx(m[r] - m_new);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < kb; ++j) {
      const float p = exp_approx(s[j] - m_new);
      s[j] = p;
      sum += p;
    }
    l[r] = l[r] * corr + sum;
    m[r] = m_new;
    if (corr != 1.f) {
      float* o = O + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o[c] *= corr;
    }
  }
}

// P = exp(scale·S − lse) in place; dS = scale·P·(dP − D) in place of dP (when dP is given).
ADAFACE_CLONES void probs_and_dlogits(float* S, float* dP, int64_t rows, int64_t kb, float scale, const float* lse,
                                      const float* D) {
  for (int64_t r = 0; r < rows; ++r) {
    float* s = S + r * kb;
    const float lr = lse[r];
    if (std::isinf(lr)) {  // no keys, or every logit -inf: the row has no probabilities
      std::fill(s, s + kb, 0.f);
      if (dP) std::fill(dP + r * kb, dP + (r + 1) * kb, 0.f);
      continue;
    }
#pragma omp simd
    for (int64_t j = 0; j < kb; ++j) s[j] = exp_approx(scale * s[j] - lr);
    if (dP) {
      float* dp = dP + r * kb;
      const float dr = D[r];
#pragma omp simd
      for (int64_t j = 0; j < kb; ++j) dp[j] = scale * s[j] * (dp[j] - dr);
    }
  }
}

template <typename T>
void gather_rows(const T* src, const int64_t* idx, int64_t count, int64_t width, float* dst) {
  for (int64_t r = 0; r < count; ++r) to_float(src + idx[r] * width, dst + r * width, width);
}

template <typename T>
void soft_warp_fwd_impl(const at::Tensor& q, const at::Tensor& k32, const at::Tensor& f, const at::Tensor& v32,
                        const ActiveRows& act, float scale, at::Tensor& rows_out, at::Tensor& lse,
                        at::Tensor& warped) {
  const int64_t Dq = q.size(2), M = k32.size(1), C = f.size(2);
  const T* pq = q.const_data_ptr<T>();
  const T* pf = f.const_data_ptr<T>();
  float* prow = rows_out.data_ptr<float>();
  float* plse = lse.data_ptr<float>();
  float* pw = warped.data_ptr<float>();
  const std::vector<RowBlock> blocks = row_blocks(act);
  const int64_t n_tasks = static_cast<int64_t>(blocks.size());
  dynamic_for(n_tasks, [&](const auto& fetch) {
    std::vector<float> Qa(kRowBlock * Dq), S(kRowBlock * kKeyBlock), O(kRowBlock * C), m(kRowBlock), l(kRowBlock),
        frow(C);
    for (int64_t t = fetch(); t < n_tasks; t = fetch()) {
      const RowBlock& blk = blocks[t];
      const int64_t cnt = blk.count;
      const int64_t* idx = act.idx.data() + blk.begin;
      gather_rows(pq, idx, cnt, Dq, Qa.data());
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      std::fill(O.begin(), O.end(), 0.f);
      at::Tensor tQ = blob(Qa.data(), cnt, Dq), tO = blob(O.data(), cnt, C);
      const at::Tensor kb_all = k32[blk.b], vb_all = v32[blk.b];
      for (int64_t j0 = 0; j0 < M; j0 += kKeyBlock) {
        const int64_t kb = std::min(kKeyBlock, M - j0);
        at::Tensor tS = blob(S.data(), cnt, kb);
        at::mm_out(tS, tQ, kb_all.narrow(0, j0, kb).t());
        online_softmax_step(S.data(), cnt, kb, scale, m.data(), l.data(), O.data(), C);
        tO.addmm_(tS, vb_all.narrow(0, j0, kb));
      }
      for (int64_t r = 0; r < cnt; ++r) {
        const int64_t row = idx[r];
        float* w = pw + row * C;
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        for (int64_t c = 0; c < C; ++c) w[c] = O[r * C + c] * inv;
        plse[row] = l[r] > 0.f ? m[r] + std::log(l[r]) : std::numeric_limits<float>::infinity();
        const float* fr = row_f32(pf + row * C, frow.data(), C);
        const float ce = static_cast<float>(kCosineEps);
        const float nw = std::sqrt(dot(w, w, C)), nf = std::sqrt(dot(fr, fr, C));
        prow[row] = 1.f - dot(w, fr, C) / (std::max(nw, ce) * std::max(nf, ce));
      }
    }
  });
}

// Per active row: dW = g·d(1 − cos)/dw (into dW), D = dW·w, and the gradient of feat_subj (when asked).
template <typename T>
void soft_warp_row_grads(const at::Tensor& grad_rows, const at::Tensor& f, const at::Tensor& warped,
                         const ActiveRows& act, at::Tensor& dW, at::Tensor& Dv, T* g_f) {
  const int64_t C = f.size(2);
  const float* pg = grad_rows.const_data_ptr<float>();
  const T* pf = f.const_data_ptr<T>();
  const float* pw = warped.const_data_ptr<float>();
  float* pdW = dW.data_ptr<float>();
  float* pD = Dv.data_ptr<float>();
  const int64_t n_active = static_cast<int64_t>(act.idx.size());
  at::parallel_for(0, n_active, row_grain(C), [&](int64_t i0, int64_t i1) {
    std::vector<float> frow(C), gf(C);
    const float ce = static_cast<float>(kCosineEps);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t row = act.idx[i];
      const float g = pg[row];
      const float* w = pw + row * C;
      const float* fr = row_f32(pf + row * C, frow.data(), C);
      const float sw = std::sqrt(dot(w, w, C)), sf = std::sqrt(dot(fr, fr, C)), wf = dot(w, fr, C);
      const float n1 = std::max(sw, ce), n2 = std::max(sf, ce);
      const float alpha = -g / (n1 * n2);
      const float beta_w = sw > 0.f ? g * wf / (n1 * n1 * n2 * sw) : 0.f;
      const float beta_f = sf > 0.f ? g * wf / (n2 * n2 * n1 * sf) : 0.f;
      float* dw = pdW + row * C;
      float d = 0.f;
      for (int64_t c = 0; c < C; ++c) {
        dw[c] = alpha * fr[c] + beta_w * w[c];
        d += dw[c] * w[c];
      }
      pD[row] = d;
      if (g_f) {
        for (int64_t c = 0; c < C; ++c) gf[c] = alpha * w[c] + beta_f * fr[c];
        from_float(gf.data(), g_f + row * C, C);
      }
    }
  });
}

// Attention backward: tasks are (batch, block of keys), handed out dynamically, so dK/dV rows have one owner.
// dQ rows get a contribution from every key block: each task adds its [rows × Dq] block of dQ under the lock of
// that row block, and tasks of one batch start their row walk at different row blocks, so they rarely wait.
ADAFACE_CLONES void add_rows(float* dst, const float* src, const int64_t* idx, int64_t cnt, int64_t width) {
  for (int64_t r = 0; r < cnt; ++r) {
    float* d = dst + idx[r] * width;
    const float* x = src + r * width;
#pragma omp simd
    for (int64_t c = 0; c < width; ++c) d[c] += x[c];
  }
}

void soft_warp_attn_bwd(const at::Tensor& q32, const at::Tensor& k32, const at::Tensor& v32, const at::Tensor& lse,
                        const at::Tensor& dW, const at::Tensor& Dv, const ActiveRows& act, float scale, bool need_q,
                        bool need_k, bool need_v, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t B = q32.size(0), Dq = q32.size(2), M = k32.size(1), C = v32.size(2);
  const int64_t key_blocks = (M + kKeyBlock - 1) / kKeyBlock;
  const float* pq = q32.const_data_ptr<float>();
  const float* plse = lse.const_data_ptr<float>();
  const float* pdW = dW.const_data_ptr<float>();
  const float* pD = Dv.const_data_ptr<float>();
  float* pdq = need_q ? dq.data_ptr<float>() : nullptr;
  const bool need_dp = need_q || need_k;
  std::vector<int64_t> lock_base(B + 1, 0);  // row block rb of batch b ↔ locks[lock_base[b] + rb]
  for (int64_t b = 0; b < B; ++b)
    lock_base[b + 1] = lock_base[b] + (act.offsets[b + 1] - act.offsets[b] + kRowBlock - 1) / kRowBlock;
  std::unique_ptr<std::mutex[]> locks(new std::mutex[std::max<int64_t>(lock_base[B], 1)]);
  const int64_t n_tasks = B * key_blocks;
  dynamic_for(n_tasks, [&](const auto& fetch) {
    std::vector<float> Qa(kRowBlock * Dq), Wa(kRowBlock * C), la(kRowBlock), Da(kRowBlock), S(kRowBlock * kKeyBlock),
        dS(kRowBlock * kKeyBlock), dQa(kRowBlock * Dq);
    for (int64_t t = fetch(); t < n_tasks; t = fetch()) {
      const int64_t b = t / key_blocks, kblk = t % key_blocks;
      const int64_t j0 = kblk * kKeyBlock, kb = std::min(kKeyBlock, M - j0);
      const int64_t n_rb = lock_base[b + 1] - lock_base[b];
      if (n_rb == 0) continue;
      const at::Tensor Kj = k32[b].narrow(0, j0, kb), Vj = v32[b].narrow(0, j0, kb);
      at::Tensor dVj = need_v ? dv[b].narrow(0, j0, kb) : at::Tensor();
      at::Tensor dKj = need_k ? dk[b].narrow(0, j0, kb) : at::Tensor();
      const int64_t first = (kblk * n_rb) / key_blocks;  // stagger the row walks of one batch's tasks
      for (int64_t step = 0; step < n_rb; ++step) {
        const int64_t rb = (first + step) % n_rb;
        const int64_t s = act.offsets[b] + rb * kRowBlock;
        const int64_t cnt = std::min(kRowBlock, act.offsets[b + 1] - s);
        const int64_t* idx = act.idx.data() + s;
        gather_rows(pq, idx, cnt, Dq, Qa.data());
        gather_rows(pdW, idx, cnt, C, Wa.data());
        for (int64_t r = 0; r < cnt; ++r) {
          la[r] = plse[idx[r]];
          Da[r] = pD[idx[r]];
        }
        at::Tensor tQ = blob(Qa.data(), cnt, Dq), tW = blob(Wa.data(), cnt, C), tdQ = blob(dQa.data(), cnt, Dq);
        at::Tensor tS = blob(S.data(), cnt, kb), tdS = blob(dS.data(), cnt, kb);
        at::mm_out(tS, tQ, Kj.t());
        if (need_dp) at::mm_out(tdS, tW, Vj.t());
        probs_and_dlogits(S.data(), need_dp ? dS.data() : nullptr, cnt, kb, scale, la.data(), Da.data());
        if (need_v) dVj.addmm_(tS.t(), tW);
        if (need_k) dKj.addmm_(tdS.t(), tQ);
        if (need_q) {
          at::mm_out(tdQ, tdS, Kj);
          const std::lock_guard<std::mutex> guard(locks[lock_base[b] + rb]);
          add_rows(pdq, dQa.data(), idx, cnt, Dq);
        }
      }
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
  if (!act.idx.empty() && (nq || nk || nf || nv)) {
    const at::Tensor g = grad_rows.to(at::kFloat).contiguous(), w = warped.contiguous(), f = feat_subj.contiguous();
    at::Tensor dW = at::empty({B, N, C}, f32), Dv = at::empty({B, N}, f32);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "soft_warp_row_grads_cpu", [&] {
      soft_warp_row_grads<scalar_t>(g, f, w, act, dW, Dv, nf ? g_f.data_ptr<scalar_t>() : nullptr);
    });
    if ((nq || nk || nv) && M > 0) {
      if (nq) dq32 = at::zeros({B, N, Dq}, f32);
      const at::Tensor q32 = as_f32(q_subj), k32 = as_f32(q_comp), v32 = as_f32(feat_comp);
      soft_warp_attn_bwd(q32, k32, v32, lse.contiguous(), dW, Dv, act, static_cast<float>(scale), nq, nk, nv, dq32,
                         dk32, dv32);
    }
  }
  at::Tensor g_q = nq ? (dq32.defined() ? dq32.to(q_subj.scalar_type()) : at::zeros_like(q_subj)) : empty;
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
