// Shared declarations of the adaface loss kernels (CPU in losses_cpu.cpp, CUDA in losses_cuda.cu).
//
// delta cosine, per row of the last dimension C (a = *_comp, b = *_single, D = b·b + eps):
//   λ = (a·b)/D,  Δ = a − λ·b  (for the subject side Δs and the class side Δc)
//   loss = 1 − cos(Δs, Δc),  cos = (Δs·Δc) / (max(|Δs|, 1e-8)·max(|Δc|, 1e-8))   (torch's cosine_similarity)
// The forward saves per row STATS = {λs, λc, Ds, Dc, |Δs|, |Δc|, Δs·Δc, unused}; the backward recomputes Δ
// per element from them (never expanding |a − λb|² algebraically, which cancels for nearly parallel a, b).
//
// soft warp, per batch b and query row n (weights[b, n] == 0: loss 0, no work):
//   p = softmax_m(scale·q_n·k_m),  w = Σ_m p_m v_m,  loss = 1 − cos(w, f_n)
// Saved state (the same for the Triton, CUDA and C++ backends): rows [B, N] fp32, warped w [B, N, C] fp32,
// lse2 [B, N] fp32 = log2 Σ_m 2^(scale·log2(e)·q_n·k_m), order [B, N] int32 (per batch the selected rows
// ascending, then the others) and count [B] int32 (how many are selected). warped and lse2 are defined on the
// selected rows only; the backward reads nothing else.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace adaface {

constexpr double kCosineEps = 1e-8;  // torch.nn.functional.cosine_similarity's default
constexpr int64_t kDeltaStats = 8;

std::tuple<at::Tensor, at::Tensor> delta_cosine_fwd_cpu(const at::Tensor& subj_single, const at::Tensor& subj_comp,
                                                        const at::Tensor& cls_single, const at::Tensor& cls_comp,
                                                        double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> delta_cosine_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& subj_single, const at::Tensor& subj_comp, const at::Tensor& cls_single,
    const at::Tensor& cls_comp, const at::Tensor& stats, double eps, at::IntArrayRef needs);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_warp_fwd_cpu(
    const at::Tensor& q_subj, const at::Tensor& q_comp, const at::Tensor& feat_subj, const at::Tensor& feat_comp,
    const at::Tensor& weights, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_warp_bwd_cpu(
    const at::Tensor& grad_rows, const at::Tensor& q_subj, const at::Tensor& q_comp, const at::Tensor& feat_subj,
    const at::Tensor& feat_comp, const at::Tensor& weights, const at::Tensor& warped, const at::Tensor& lse,
    const at::Tensor& order, const at::Tensor& count, double scale, bool need_qs, bool need_qc, bool need_fs,
    bool need_fc);

// Checks shared by both devices: shapes, dtypes and devices of the loss inputs.
void check_delta_inputs(const at::Tensor& subj_single, const at::Tensor& subj_comp, const at::Tensor& cls_single,
                        const at::Tensor& cls_comp);
void check_soft_warp_inputs(const at::Tensor& q_subj, const at::Tensor& q_comp, const at::Tensor& feat_subj,
                            const at::Tensor& feat_comp, const at::Tensor& weights);
// Shapes, dtypes and devices of the soft-warp backward's saved state (see above).
void check_saved_state(const at::Tensor& q_subj, const at::Tensor& feat_subj, const at::Tensor& grad_rows,
                       const at::Tensor& warped, const at::Tensor& lse, const at::Tensor& order,
                       const at::Tensor& count);
bool need(at::IntArrayRef needs, int64_t i);

}  // namespace adaface
