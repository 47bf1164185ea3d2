// CPU kernels of the two losses and the registration of the `torch.ops.adaface.*_ext_*` ops (schemas here,
// CPU implementations here, CUDA implementations in losses_cuda.cu, fake/autograd in adaface/ops/_extension.py).
//
// Delta cosine: at::parallel_for over rows; inner loops on contiguous fp32 rows with `omp simd` reductions, in
// avx512/avx2/baseline clones picked at load time (this file is compiled with -fopenmp so at::parallel_for
// really forks, see setup.py).
//
// Soft warp: a batch's selected rows are taken in blocks of up to R rows, and every block is a few large
// ATen GEMMs over all M keys at once, each threaded by the BLAS itself; the elementwise softmax steps between
// them are split over the block's rows by at::parallel_for. Holding whole rows of the logits makes the
// softmax exact in one pass (no running rescale); R keeps one [R, M] block near 4 MB.
//   forward  (2 GEMMs):  S = Q Kᵀ;  P = softmax(scale·S) in place, lse saved;  W = P V
//   backward (5 GEMMs):  S = Q Kᵀ recomputed, P = exp2(scale·log2e·S − lse2);  dP = dW Vᵀ;
//                        dS = scale·P·(dP − D);  dQ = dS K;  dK += dSᵀ Q;  dV += Pᵀ dW
// The eager reference needs one GEMM fewer (it keeps P from its forward) but holds [B, N, M] matrices.
#include "cosine.h"
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
#include <tuple>
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
  TORCH_CHECK(subj_single.dim() >= 1, "delta_cosine_ext_fwd: inputs must be [..., C]");
  for (const at::Tensor* t : {&subj_comp, &cls_single, &cls_comp}) {
    TORCH_CHECK(t->sizes() == subj_single.sizes(), "delta_cosine_ext_fwd: all inputs must have one shape");
    TORCH_CHECK(t->scalar_type() == subj_single.scalar_type(), "delta_cosine_ext_fwd: all inputs must have one dtype");
    TORCH_CHECK(t->device() == subj_single.device(), "delta_cosine_ext_fwd: all inputs must be on one device");
  }
  const auto st = subj_single.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "delta_cosine_ext_fwd: dtype must be float32, float16 or bfloat16");
}

void check_soft_warp_inputs(const at::Tensor& q_subj, const at::Tensor& q_comp, const at::Tensor& feat_subj,
                            const at::Tensor& feat_comp, const at::Tensor& weights) {
  TORCH_CHECK(q_subj.dim() == 3 && q_comp.dim() == 3 && feat_subj.dim() == 3 && feat_comp.dim() == 3,
              "soft_warp_ext_fwd: inputs must be 3-D");
  const int64_t B = q_subj.size(0), N = q_subj.size(1), Dq = q_subj.size(2);
  const int64_t M = q_comp.size(1), C = feat_subj.size(2);
  TORCH_CHECK(q_comp.size(0) == B && q_comp.size(2) == Dq, "soft_warp_ext_fwd: q_comp must be [B, M, Dq]");
  TORCH_CHECK(feat_subj.size(0) == B && feat_subj.size(1) == N, "soft_warp_ext_fwd: feat_subj must be [B, N, C]");
  TORCH_CHECK(feat_comp.size(0) == B && feat_comp.size(1) == M && feat_comp.size(2) == C,
              "soft_warp_ext_fwd: feat_comp must be [B, M, C]");
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == B && weights.size(1) == N,
              "soft_warp_ext_fwd: weights must be [B, N]");
  TORCH_CHECK(weights.scalar_type() == at::kFloat, "soft_warp_ext_fwd: weights must be float32");
  for (const at::Tensor* t : {&q_comp, &feat_subj, &feat_comp}) {
    TORCH_CHECK(t->scalar_type() == q_subj.scalar_type(), "soft_warp_ext_fwd: inputs must have one dtype");
    TORCH_CHECK(t->device() == q_subj.device(), "soft_warp_ext_fwd: inputs must be on one device");
  }
  TORCH_CHECK(weights.device() == q_subj.device(), "soft_warp_ext_fwd: weights must be on the inputs' device");
  const auto st = q_subj.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "soft_warp_ext_fwd: dtype must be float32, float16 or bfloat16");
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
  return {cosine_loss(dd, ns, nc), {ls, lc, Ds, Dc, ns, nc, dd, 0.f}};
}

// Gradients of one row; any output pointer may be null (not needed).
ADAFACE_CLONES void delta_row_bwd(float g, const float* st, const float* bs, const float* as, const float* bc,
                                  const float* ac, int64_t C, float* g_bs, float* g_as, float* g_bc, float* g_ac) {
  const float ls = st[0], lc = st[1], Ds = st[2], Dc = st[3], ns = st[4], nc = st[5], dd = st[6];
  // d(1 − cos)/dΔs = −Δc/(n1 n2) + (Δs·Δc)/(n1² n2)·Δs/|Δs|, as torch's autograd of cosine_similarity.
  const auto [alpha, beta_s, beta_c] = cosine_grad(g, dd, ns, nc);
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

// A task is a block of up to R selected rows of one batch against all M keys; R keeps one [R, M] block of
// logits near 0.75 MB, so that two of them per worker (the backward's S and dS) stay in cache-sized scratch.
constexpr int64_t kBlockFloats = int64_t{3} << 16;
constexpr int64_t kMinBlockRows = 16;
constexpr int64_t kMaxBlockRows = 256;
constexpr int64_t kKeyChunk = 256;  // dK/dV rows updated under one lock
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int64_t block_rows(int64_t M) {
  return std::clamp<int64_t>(kBlockFloats / std::max<int64_t>(M, 1), kMinBlockRows, kMaxBlockRows);
}

// 2^x: x = k + f with k = round(x), |f| <= 1/2, and a degree-7 Taylor polynomial of e^(f·ln2) (truncation
// error < 2e-9 relative); x < -126 (and -inf) gives 0. Plain float/int ops, so that it vectorises in `omp simd`.
#pragma omp declare simd notinbranch
inline float exp2_approx(float x) {
  const float xc = std::min(std::max(x, -126.f), 127.f);
  const float kf = (xc + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (xc - kf) * 0.693147180559945309f;
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
  return x < -126.f ? 0.f : p * two_k;
}

// One row of logits s[0, M) → softmax(scale·s) in place; returns lse2 = log2 Σ_j 2^(scale·log2e·s_j)
// (-inf for M = 0, with nothing to normalise).
ADAFACE_CLONES float softmax_row(float* s, int64_t M, float scale2) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < M; ++j) {
    s[j] *= scale2;
    m = s[j] > m ? s[j] : m;
  }
  const float base = m == kNegInf ? 0.f : m;  // all -inf: p = 0 instead of NaN
  float l = 0.f;
#pragma omp simd reduction(+ : l)
  for (int64_t j = 0; j < M; ++j) {
    const float p = exp2_approx(s[j] - base);
    s[j] = p;
    l += p;
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma omp simd
  for (int64_t j = 0; j < M; ++j) s[j] *= inv;
  return l > 0.f ? base + std::log2(l) : kNegInf;
}

// P in place of s, dS = scale·P·(dP − D) in place of dp (when given), from this row's logits alone.
// With logits ~1e4 an fp32 ulp is ~1e-3, and the recomputed logits need not match the forward's bit for bit
// (the compiler may contract `scale2·s − lse2` into an FMA, e.g. in the AVX-512 clone). So P is normalised
// here (2^(· − lse2) only keeps it in range) and D = Σ P·dP uses this P, not dW·warped from the forward:
// then Σ_j dS_j = 0 to rounding, which dQ = dS·K needs when K's rows share a large common part.
ADAFACE_CLONES void probs_and_dlogits_row(float* s, float* dp, int64_t M, float scale2, float scale, float lse2) {
  float l = 0.f;
#pragma omp simd reduction(+ : l)
  for (int64_t j = 0; j < M; ++j) {
    s[j] = exp2_approx(scale2 * s[j] - lse2);
    l += s[j];
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma omp simd
  for (int64_t j = 0; j < M; ++j) s[j] *= inv;
  if (!dp) return;
  float D = 0.f;
#pragma omp simd reduction(+ : D)
  for (int64_t j = 0; j < M; ++j) D += s[j] * dp[j];
#pragma omp simd
  for (int64_t j = 0; j < M; ++j) dp[j] = scale * s[j] * (dp[j] - D);
}

// 1 − cos(w, f) as torch.nn.functional.cosine_similarity (norms clamped to kCosineEps).
ADAFACE_CLONES float cosine_loss_row(const float* w, const float* f, int64_t C) {
  const float nw = std::sqrt(dot(w, w, C)), nf = std::sqrt(dot(f, f, C));
  return cosine_loss(dot(w, f, C), nw, nf);
}

// dW = g·d(1 − cos)/dw into dw; the gradient of f into gf (when given).
ADAFACE_CLONES void cosine_row_grads(float g, const float* w, const float* fr, int64_t C, float* dw, float* gf) {
  const float sw = std::sqrt(dot(w, w, C)), sf = std::sqrt(dot(fr, fr, C)), wf = dot(w, fr, C);
  const auto [alpha, beta_w, beta_f] = cosine_grad(g, wf, sw, sf);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) dw[c] = alpha * fr[c] + beta_w * w[c];
  if (gf) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) gf[c] = alpha * w[c] + beta_f * fr[c];
  }
}

// The saved row selection (the contract shared with the Triton kernels): per batch b, order[b, :count[b]]
// are the selected rows (weight != 0) in ascending order, then the others; count[b] how many are selected.
std::tuple<at::Tensor, at::Tensor> compact_rows(const at::Tensor& weights) {
  const int64_t B = weights.size(0), N = weights.size(1);
  const at::Tensor w = weights.contiguous();
  const float* pw = w.const_data_ptr<float>();
  at::Tensor order = at::empty({B, N}, w.options().dtype(at::kInt));
  at::Tensor count = at::empty({B}, w.options().dtype(at::kInt));
  int32_t* po = order.data_ptr<int32_t>();
  int32_t* pc = count.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    int32_t* ob = po + b * N;
    int64_t sel = 0;
    for (int64_t n = 0; n < N; ++n)
      if (pw[b * N + n] != 0.f) ob[sel++] = static_cast<int32_t>(n);
    int64_t rest = sel;
    for (int64_t n = 0; n < N; ++n)
      if (pw[b * N + n] == 0.f) ob[rest++] = static_cast<int32_t>(n);
    pc[b] = static_cast<int32_t>(sel);
  }
  return {order, count};
}

// Positions [start, start + count) of one batch's selected rows: their row numbers, and whether they are
// consecutive (then blocks of the batch's matrices are views, not gathered copies).
struct RowSpan {
  const int32_t* rows;
  int64_t count;
  bool consecutive;
  at::Tensor index;  // int64 [count] row numbers, for gathers and scatters when not consecutive

  RowSpan(const int32_t* order_b, int64_t start, int64_t cnt, int64_t N) : rows(order_b + start), count(cnt) {
    for (int64_t i = 0; i < cnt; ++i)
      TORCH_CHECK(rows[i] >= 0 && rows[i] < N, "soft_warp_ext_bwd: `order` holds row ", rows[i],
                  ", outside [0, ", N, ")");
    consecutive = cnt > 0 && rows[cnt - 1] - rows[0] == cnt - 1;  // ascending and unique: consecutive
    if (!consecutive) {
      index = at::empty({cnt}, at::TensorOptions().dtype(at::kLong));
      int64_t* pi = index.data_ptr<int64_t>();
      for (int64_t i = 0; i < cnt; ++i) pi[i] = rows[i];
    }
  }

  // rows of an [N, W] matrix as a [count, W] one: a view when consecutive, else gathered into buf [>= count, W]
  at::Tensor take(const at::Tensor& m, const at::Tensor& buf) const {
    if (consecutive) return m.narrow(0, rows[0], count);
    at::Tensor out = buf.narrow(0, 0, count);
    return at::index_select_out(out, m, 0, index);
  }
  // where to write rows of an [N, W] result: a view when consecutive, else buf for `put`
  at::Tensor target(const at::Tensor& m, const at::Tensor& buf) const {
    return consecutive ? m.narrow(0, rows[0], count) : buf.narrow(0, 0, count);
  }
  void put(at::Tensor m, const at::Tensor& block) const {
    if (!consecutive) m.index_copy_(0, index, block);
  }
};

// Row blocks of every batch's selected rows, round-robin over batches (b0 r0, b1 r0, b0 r1, ...): tasks that
// run at the same time are then mostly of different batches, whose dK/dV rows (and locks) are disjoint.
struct Task {
  int64_t b, start, count, rank;
};

std::vector<Task> row_tasks(const std::vector<int32_t>& counts, int64_t R) {
  std::vector<Task> tasks;
  for (int64_t rank = 0, any = 1; any; ++rank) {
    any = 0;
    for (size_t b = 0; b < counts.size(); ++b) {
      const int64_t s = rank * R;
      if (s < counts[b]) {
        tasks.push_back({static_cast<int64_t>(b), s, std::min<int64_t>(R, counts[b] - s), rank});
        any = 1;
      }
    }
  }
  return tasks;
}

// Tasks are handed out one at a time from a shared counter (not pre-split per thread): a thread that is
// descheduled on a busy machine does not hold back a fixed share of the work. `per_worker(w, fetch)` runs once
// per worker w and loops `for (t = fetch(); t < n; t = fetch())`. Inside the workers ATen's GEMMs run
// single-threaded, one block per core, with no synchronisation between the cores per product.
int64_t worker_count(int64_t n_tasks) {
  return std::max<int64_t>(1, std::min<int64_t>(n_tasks, at::get_num_threads()));
}

template <typename F>
void dynamic_for(int64_t n, const F& per_worker) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const auto fetch = [&next]() { return next.fetch_add(1, std::memory_order_relaxed); };
  at::parallel_for(0, worker_count(n), 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) per_worker(w, fetch);
  });
}

// A worker's scratch: its row of a [workers, floats] tensor allocated by the calling thread (so that it shows
// in torch's memory accounting like any other allocation of the op), carved into matrices.
struct Carve {
  at::Tensor row;
  int64_t used = 0;
  at::Tensor take(int64_t rows, int64_t cols) {
    at::Tensor t = row.narrow(0, used, rows * cols).view({rows, cols});
    used += rows * cols;
    return t;
  }
};

bool all_selected(const std::vector<int32_t>& counts, int64_t N) {
  return std::all_of(counts.begin(), counts.end(), [N](int32_t c) { return c == N; });
}

// out (+)= a·b: the first update of a chunk (`written` still 0) writes instead of adding to uninitialised memory.
void accumulate_product(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, char& written) {
  if (written) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
    written = 1;
  }
}

// Whether some batch has a partial selection (its blocks may need gathered copies instead of views).
bool partial_selection(const std::vector<int32_t>& counts, int64_t N) {
  return std::any_of(counts.begin(), counts.end(), [N](int32_t c) { return c > 0 && c < N; });
}

std::vector<int32_t> counts_of(const at::Tensor& count, int64_t N) {
  const at::Tensor c = count.contiguous();
  std::vector<int32_t> out(c.const_data_ptr<int32_t>(), c.const_data_ptr<int32_t>() + c.numel());
  for (const int32_t n : out)
    TORCH_CHECK(n >= 0 && n <= N, "soft_warp_ext_bwd: `count` holds ", n, ", outside [0, ", N, "]");
  return out;
}

// detach(): the OpenMP workers do not inherit the caller's autograd-exclusion guard.
at::Tensor as_f32(const at::Tensor& t) { return t.detach().to(at::kFloat).contiguous(); }

}  // namespace

// ------------------------------------------------------------------------------------------------
// Op entry points (CPU)

void check_saved_state(const at::Tensor& q_subj, const at::Tensor& feat_subj, const at::Tensor& grad_rows,
                       const at::Tensor& warped, const at::Tensor& lse, const at::Tensor& order,
                       const at::Tensor& count) {
  const int64_t B = q_subj.size(0), N = q_subj.size(1), C = feat_subj.size(2);
  const auto dev = q_subj.device();
  TORCH_CHECK(grad_rows.sizes() == at::IntArrayRef({B, N}) && grad_rows.device() == dev,
              "soft_warp_ext_bwd: grad_rows must be [B, N] on the inputs' device");
  TORCH_CHECK(warped.sizes() == at::IntArrayRef({B, N, C}) && warped.scalar_type() == at::kFloat &&
                  warped.device() == dev,
              "soft_warp_ext_bwd: warped must be float32 [B, N, C] on the inputs' device");
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({B, N}) && lse.scalar_type() == at::kFloat && lse.device() == dev,
              "soft_warp_ext_bwd: lse must be float32 [B, N] on the inputs' device");
  TORCH_CHECK(order.sizes() == at::IntArrayRef({B, N}) && order.scalar_type() == at::kInt && order.device() == dev,
              "soft_warp_ext_bwd: order must be int32 [B, N] on the inputs' device");
  TORCH_CHECK(count.sizes() == at::IntArrayRef({B}) && count.scalar_type() == at::kInt && count.device() == dev,
              "soft_warp_ext_bwd: count must be int32 [B] on the inputs' device");
}

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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_warp_fwd_cpu(
    const at::Tensor& q_subj, const at::Tensor& q_comp, const at::Tensor& feat_subj, const at::Tensor& feat_comp,
    const at::Tensor& weights, double scale) {
  check_soft_warp_inputs(q_subj, q_comp, feat_subj, feat_comp, weights);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls below are not differentiated
  const int64_t B = q_subj.size(0), N = q_subj.size(1), M = q_comp.size(1), C = feat_subj.size(2);
  const auto f32 = q_subj.options().dtype(at::kFloat);
  auto [order, count] = compact_rows(weights);
  // rows that are not selected: loss 0; their warped and lse entries are not part of the contract (0 here)
  const std::vector<int32_t> counts = counts_of(count, N);
  at::Tensor rows = at::zeros({B, N}, f32);
  at::Tensor warped = all_selected(counts, N) ? at::empty({B, N, C}, f32) : at::zeros({B, N, C}, f32);
  at::Tensor lse = at::zeros({B, N}, f32);
  if (B * N == 0) return {rows, warped, lse, order, count};
  const at::Tensor q32 = as_f32(q_subj), k32 = as_f32(q_comp), f32s = as_f32(feat_subj), v32 = as_f32(feat_comp);
  const int64_t R = std::min(block_rows(M), N), Dq = q_subj.size(2);
  const std::vector<Task> tasks = row_tasks(counts, R);
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  const bool gather = partial_selection(counts, N);
  const int64_t per_worker = R * M + (gather ? R * (Dq + 2 * C) : 0);
  at::Tensor scratch = at::empty({worker_count(n_tasks), per_worker}, f32);
  const float scale2 = static_cast<float>(scale) * kLog2e;
  float* prow = rows.data_ptr<float>();
  float* plse = lse.data_ptr<float>();
  dynamic_for(n_tasks, [&](int64_t wk, const auto& fetch) {
    Carve sc{scratch[wk]};
    const at::Tensor S_buf = sc.take(R, M);
    const at::Tensor Q_buf = gather ? sc.take(R, Dq) : at::Tensor(), F_buf = gather ? sc.take(R, C) : at::Tensor(),
                     W_buf = gather ? sc.take(R, C) : at::Tensor();
    for (int64_t t = fetch(); t < n_tasks; t = fetch()) {
      const Task& task = tasks[t];
      const int64_t b = task.b;
      const RowSpan span(order.const_data_ptr<int32_t>() + b * N, task.start, task.count, N);
      const int64_t r = span.count;
      at::Tensor S = S_buf.narrow(0, 0, r);
      at::mm_out(S, span.take(q32[b], Q_buf), k32[b].t());  // S = Q Kᵀ
      float* ps = S.data_ptr<float>();
      for (int64_t i = 0; i < r; ++i) plse[b * N + span.rows[i]] = softmax_row(ps + i * M, M, scale2);
      at::Tensor W = span.target(warped[b], W_buf);
      at::mm_out(W, S, v32[b]);  // W = P V
      span.put(warped[b], W);
      const at::Tensor F = span.take(f32s[b], F_buf);
      const float* pw = W.const_data_ptr<float>();
      const float* pf = F.const_data_ptr<float>();
      for (int64_t i = 0; i < r; ++i) prow[b * N + span.rows[i]] = cosine_loss_row(pw + i * C, pf + i * C, C);
    }
  });
  return {rows, warped, lse, order, count};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_warp_bwd_cpu(
    const at::Tensor& grad_rows, const at::Tensor& q_subj, const at::Tensor& q_comp, const at::Tensor& feat_subj,
    const at::Tensor& feat_comp, const at::Tensor& weights, const at::Tensor& warped, const at::Tensor& lse,
    const at::Tensor& order, const at::Tensor& count, double scale, bool need_qs, bool need_qc, bool need_fs,
    bool need_fc) {
  check_soft_warp_inputs(q_subj, q_comp, feat_subj, feat_comp, weights);
  check_saved_state(q_subj, feat_subj, grad_rows, warped, lse, order, count);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls below are not differentiated
  const int64_t B = q_subj.size(0), N = q_subj.size(1), Dq = q_subj.size(2), M = q_comp.size(1),
                C = feat_subj.size(2);
  const auto f32 = q_subj.options().dtype(at::kFloat);
  const std::vector<int32_t> counts = counts_of(count, N);
  // Unselected rows get zero gradients. Outputs every row of which is written are not zero-filled first: dQ
  // and d feat_subj when all rows are selected; dK and dV chunks are written by their first update (below).
  const bool all = all_selected(counts, N);
  const auto rows_out = [&](bool needed, int64_t width, bool written) {
    return !needed ? at::Tensor() : written ? at::empty({B, N, width}, f32) : at::zeros({B, N, width}, f32);
  };
  at::Tensor dq = rows_out(need_qs, Dq, all && M > 0), df = rows_out(need_fs, C, all);
  at::Tensor dk = need_qc ? at::empty({B, M, Dq}, f32) : at::Tensor();
  at::Tensor dv = need_fc ? at::empty({B, M, C}, f32) : at::Tensor();
  const bool need_attn = (need_qs || need_qc || need_fc) && M > 0;
  const bool need_dp = need_qs || need_qc;
  const int64_t key_chunks = (M + kKeyChunk - 1) / kKeyChunk;
  // written[2·(b·key_chunks + chunk) + {0: dK, 1: dV}]: whether that chunk has had its first update
  std::vector<char> written(std::max<int64_t>(2 * B * key_chunks, 1), 0);
  if (B * N > 0 && (need_attn || need_fs)) {
    const at::Tensor g = grad_rows.detach().to(at::kFloat).contiguous(), w = warped.detach().contiguous(),
                     f32s = as_f32(feat_subj), ls = lse.detach().contiguous();
    const at::Tensor q32 = need_attn ? as_f32(q_subj) : at::Tensor(), k32 = need_attn ? as_f32(q_comp) : at::Tensor(),
                     v32 = need_attn ? as_f32(feat_comp) : at::Tensor();
    const at::Tensor ord = order.contiguous();
    const int64_t R = std::min(block_rows(M), N);
    const std::vector<Task> tasks = row_tasks(counts, R);
    const int64_t n_tasks = static_cast<int64_t>(tasks.size());
    const bool gather = partial_selection(counts, N);
    const int64_t per_worker = (need_attn ? R * M * (need_dp ? 2 : 1) : 0) + R * C +
                               (gather ? R * (2 * Dq + 3 * C) : 0);
    at::Tensor scratch = at::empty({worker_count(n_tasks), per_worker}, f32);
    // locks[2·(b·key_chunks + chunk) + {0: dK, 1: dV}]
    std::unique_ptr<std::mutex[]> locks(new std::mutex[std::max<int64_t>(2 * B * key_chunks, 1)]);
    const float sc = static_cast<float>(scale), scale2 = sc * kLog2e;
    const float* pg = g.const_data_ptr<float>();
    const float* plse = ls.const_data_ptr<float>();
    dynamic_for(n_tasks, [&](int64_t wk, const auto& fetch) {
      Carve carve{scratch[wk]};
      const at::Tensor S_buf = need_attn ? carve.take(R, M) : at::Tensor();
      const at::Tensor dS_buf = need_attn && need_dp ? carve.take(R, M) : at::Tensor();
      const at::Tensor dW_buf = carve.take(R, C);
      at::Tensor Q_buf, W_buf, F_buf, dF_buf, dQ_buf;
      if (gather) {
        Q_buf = carve.take(R, Dq), W_buf = carve.take(R, C), F_buf = carve.take(R, C), dF_buf = carve.take(R, C);
        dQ_buf = carve.take(R, Dq);
      }
      for (int64_t t = fetch(); t < n_tasks; t = fetch()) {
        const Task& task = tasks[t];
        const int64_t b = task.b;
        const RowSpan span(ord.const_data_ptr<int32_t>() + b * N, task.start, task.count, N);
        const int64_t r = span.count;
        // the cosine's gradients: dW (the warped rows') and feat_subj's
        const at::Tensor Wb = span.take(w[b], W_buf), Fb = span.take(f32s[b], F_buf);
        at::Tensor dW = dW_buf.narrow(0, 0, r);
        at::Tensor dF = need_fs ? span.target(df[b], dF_buf) : at::Tensor();
        const float *pw = Wb.const_data_ptr<float>(), *pf = Fb.const_data_ptr<float>();
        float* pdw = dW.data_ptr<float>();
        float* pdf = need_fs ? dF.data_ptr<float>() : nullptr;
        for (int64_t i = 0; i < r; ++i)
          cosine_row_grads(pg[b * N + span.rows[i]], pw + i * C, pf + i * C, C, pdw + i * C, pdf ? pdf + i * C : nullptr);
        if (need_fs) span.put(df[b], dF);
        if (!need_attn) continue;
        // the attention's: P recomputed from the saved lse, dS, then the three products
        const at::Tensor Qb = span.take(q32[b], Q_buf), Kb = k32[b], Vb = v32[b];
        at::Tensor S = S_buf.narrow(0, 0, r);
        at::mm_out(S, Qb, Kb.t());  // S = Q Kᵀ
        at::Tensor dS = need_dp ? dS_buf.narrow(0, 0, r) : at::Tensor();
        if (need_dp) at::mm_out(dS, dW, Vb.t());  // dP = dW Vᵀ
        float* ps = S.data_ptr<float>();
        float* pds = need_dp ? dS.data_ptr<float>() : nullptr;
        for (int64_t i = 0; i < r; ++i)
          probs_and_dlogits_row(ps + i * M, pds ? pds + i * M : nullptr, M, scale2, sc, plse[b * N + span.rows[i]]);
        if (need_qs) {
          at::Tensor dQ = span.target(dq[b], dQ_buf);
          at::mm_out(dQ, dS, Kb);  // dQ = dS K (the task owns these rows)
          span.put(dq[b], dQ);
        }
        // dK, dV rows are shared by the batch's tasks: key chunks under locks, from a different chunk per task
        for (int64_t step = 0; step < key_chunks && (need_qc || need_fc); ++step) {
          const int64_t chunk = (task.rank + step) % key_chunks;
          const int64_t j0 = chunk * kKeyChunk, kb = std::min(kKeyChunk, M - j0);
          const int64_t at = 2 * (b * key_chunks + chunk);
          if (need_fc) {
            const std::lock_guard<std::mutex> guard(locks[at + 1]);
            at::Tensor dv_j = dv[b].narrow(0, j0, kb);
            accumulate_product(dv_j, S.narrow(1, j0, kb).t(), dW, written[at + 1]);  // dV += Pᵀ dW
          }
          if (need_qc) {
            const std::lock_guard<std::mutex> guard(locks[at]);
            at::Tensor dk_j = dk[b].narrow(0, j0, kb);
            accumulate_product(dk_j, dS.narrow(1, j0, kb).t(), Qb, written[at]);  // dK += dSᵀ Q
          }
        }
      }
    });
  }
  for (int64_t b = 0; b < B; ++b)  // chunks no task updated (a batch with no selected row)
    for (int64_t chunk = 0; chunk < key_chunks; ++chunk) {
      const int64_t j0 = chunk * kKeyChunk, kb = std::min(kKeyChunk, M - j0), at = 2 * (b * key_chunks + chunk);
      if (need_qc && !written[at]) dk[b].narrow(0, j0, kb).zero_();
      if (need_fc && !written[at + 1]) dv[b].narrow(0, j0, kb).zero_();
    }
  const auto dt = q_subj.scalar_type();
  const auto empty = at::empty({0}, q_subj.options());
  return {need_qs ? dq.to(dt) : empty, need_qc ? dk.to(dt) : empty, need_fs ? df.to(dt) : empty,
          need_fc ? dv.to(dt) : empty};
}

}  // namespace adaface

// ------------------------------------------------------------------------------------------------
// Registration. FRAGMENT: Python also defines `adaface::*` ops (the Triton ones) in this namespace.
// Names follow adaface::{op}_{backend}_{fwd|bwd}; the soft-warp pair has the Triton pair's schema (one saved
// state: rows, warped, lse in base 2, order, count).
TORCH_LIBRARY_FRAGMENT(adaface, m) {
  m.def("delta_cosine_ext_fwd(Tensor subj_single, Tensor subj_comp, Tensor cls_single, Tensor cls_comp, float eps)"
        " -> (Tensor, Tensor)");
  m.def("delta_cosine_ext_bwd(Tensor grad, Tensor subj_single, Tensor subj_comp, Tensor cls_single, "
        "Tensor cls_comp, Tensor stats, float eps, int[] needs) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("soft_warp_ext_fwd(Tensor q_subj, Tensor q_comp, Tensor feat_subj, Tensor feat_comp, Tensor weights, "
        "float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("soft_warp_ext_bwd(Tensor grad_rows, Tensor q_subj, Tensor q_comp, Tensor feat_subj, Tensor feat_comp, "
        "Tensor weights, Tensor warped, Tensor lse, Tensor order, Tensor count, float scale, bool need_qs, "
        "bool need_qc, bool need_fs, bool need_fc) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(adaface, CPU, m) {
  m.impl("delta_cosine_ext_fwd", &adaface::delta_cosine_fwd_cpu);
  m.impl("delta_cosine_ext_bwd", &adaface::delta_cosine_bwd_cpu);
  m.impl("soft_warp_ext_fwd", &adaface::soft_warp_fwd_cpu);
  m.impl("soft_warp_ext_bwd", &adaface::soft_warp_bwd_cpu);
}
