// Per-token mHC math on fp32 scalars and small n×n matrices.
// Every function is __host__ __device__: the kernels call them from one warp
// per token (lane = row or column), and tests/test_token_math.py compiles this
// header for the host and checks it against mhc_gen/reference.py.
#pragma once

#include "platform.h"

namespace mhc {

// m = n² + 2n mixing logits a token: n pre, n post, n² res.
MHC_CX int num_logits(int n) { return n * n + 2 * n; }

// Which group logit k belongs to, as α and ∂α index them: 0 pre, 1 post, 2 res.
MHC_CX int logit_kind(int k, int n) { return k < n ? 0 : (k < 2 * n ? 1 : 2); }

MHC_HD float sigmoid(float v) { return 1.0f / (1.0f + fast_exp(-v)); }

// r = sqrt(mean(x̄²) + eps): the RMS of one token's n·C values.
MHC_HD float token_rms(float sum_sq, int64_t count, float eps) {
  return sqrtf(sum_sq / float(count) + eps);
}

// h̃ = α·z/r + b (Eq. 16), given 1/r; static H is the same with z = 0.
MHC_HD float mix_logit(float z, float inv_r, float alpha, float bias) {
  return alpha * z * inv_r + bias;
}

MHC_HD float pre_gate(float logit) { return sigmoid(logit); }
MHC_HD float post_gate(float logit, float post_mult) { return post_mult * sigmoid(logit); }

// Row i of the coefficient epilogue (Eq. 16-18): H_pre[i], H_post[i] and row i
// of the n×n residual logits into M (leading dim ld). z is null for static H,
// whose logits are the bias alone. Returns the row's largest logit.
MHC_HD float coefficient_row(int i, int n, const float* z, float r, const float* alpha,
                             const float* bias, float post_mult, float* h_pre, float* h_post,
                             float* M, int ld) {
  const float a_pre = z ? alpha[0] : 0.0f;
  const float a_post = z ? alpha[1] : 0.0f;
  const float a_res = z ? alpha[2] : 0.0f;
  const float inv_r = 1.0f / r;  // one division a row, not 2 + n
  h_pre[i] = pre_gate(mix_logit(z ? z[i] : 0.0f, inv_r, a_pre, bias[i]));
  h_post[i] = post_gate(mix_logit(z ? z[n + i] : 0.0f, inv_r, a_post, bias[n + i]), post_mult);
  float row_max = -__builtin_inff();
  for (int j = 0; j < n; ++j) {
    const int k = 2 * n + i * n + j;
    const float l = mix_logit(z ? z[k] : 0.0f, inv_r, a_res, bias[k]);
    M[i * ld + j] = l;
    row_max = row_max > l ? row_max : l;
  }
  return row_max;
}

// 1 / d for the Sinkhorn's divisors. On CUDA devices `1.0f / d` is a fast path behind a
// branch to a slow one (denormals, huge d), and a branch each kept a step's n reciprocals
// from overlapping: a token's Sinkhorn a thread issued one at a time (H200, session 23).
// Here: the hardware approximation and one Newton step, branch-free (≤ 1 ulp; the host and
// ROCm divide). Every GPU form of the Sinkhorn and its backward calls this, so they agree
// bitwise with each other; each agrees with the float64 reference within its tolerance.
MHC_HD float sinkhorn_reciprocal(float d) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("rcp.approx.f32 %0, %1;" : "=f"(r) : "f"(d));
  const float refined = fmaf(r, fmaf(-d, r, 1.0f), r);
  return __builtin_isinf(r) ? r : refined;  // d = 0 or denormal: 1 / d is ∞, not NaN
#else
  return 1.0f / d;
#endif
}

// Sinkhorn-Knopp on an n×n matrix M stored row-major with leading dim ld.
// One step is split by the row or column it owns, so that on the GPU lane k
// runs step(k) for all k at once and on the host a loop over k does the same.

// M[i][:] = exp(M[i][:] - max_logit): row i of the start matrix.
MHC_HD void sinkhorn_exp_row(float* M, int ld, int n, int i, float max_logit) {
  for (int j = 0; j < n; ++j) M[i * ld + j] = fast_exp(M[i * ld + j] - max_logit);
}

// M[:, j] /= (Σ_i M[i][j] + eps), as one reciprocal and n multiplies (≤ 1.5 ulp, not 0.5;
// n divisions a column made the coefficient kernels 1.5× slower: H200, session 18). Every form
// of the Sinkhorn and its backward goes through these four steps, so they agree bitwise.
// Returns the divisor, which the backward needs.
MHC_HD float sinkhorn_col_step(float* M, int ld, int n, int j, float eps) {
  float s = 0.0f;
  for (int i = 0; i < n; ++i) s += M[i * ld + j];
  const float d = s + eps, inv = sinkhorn_reciprocal(d);
  for (int i = 0; i < n; ++i) M[i * ld + j] *= inv;
  return d;
}

// M[i, :] /= (Σ_j M[i][j] + eps). Returns the divisor.
MHC_HD float sinkhorn_row_step(float* M, int ld, int n, int i, float eps) {
  float s = 0.0f;
  for (int j = 0; j < n; ++j) s += M[i * ld + j];
  const float d = s + eps, inv = sinkhorn_reciprocal(d);
  for (int j = 0; j < n; ++j) M[i * ld + j] *= inv;
  return d;
}

// Backward of the column step Y = X / d (d = Σ_i X[i][j] + eps), column j:
// ∂X[i][j] = (∂Y[i][j] − Σ_k ∂Y[k][j]·Y[k][j]) / d. M holds Y on entry and X
// (= Y·d) on exit; dM holds ∂Y on entry and ∂X on exit.
MHC_HD void sinkhorn_col_step_bwd(float* M, float* dM, int ld, int n, int j, float d) {
  float dot = 0.0f;
  for (int k = 0; k < n; ++k) dot += dM[k * ld + j] * M[k * ld + j];
  const float inv = sinkhorn_reciprocal(d);
  for (int i = 0; i < n; ++i) {
    dM[i * ld + j] = (dM[i * ld + j] - dot) * inv;
    M[i * ld + j] *= d;
  }
}

// Backward of the row step, row i (same contract as the column step).
MHC_HD void sinkhorn_row_step_bwd(float* M, float* dM, int ld, int n, int i, float d) {
  float dot = 0.0f;
  for (int k = 0; k < n; ++k) dot += dM[i * ld + k] * M[i * ld + k];
  const float inv = sinkhorn_reciprocal(d);
  for (int j = 0; j < n; ++j) {
    dM[i * ld + j] = (dM[i * ld + j] - dot) * inv;
    M[i * ld + j] *= d;
  }
}

// Backward of M0 = exp(L − max L) for row i: ∂L = ∂M0 ⊙ M0 (the max is a
// constant shift with no gradient). dM holds ∂M0 on entry and ∂L on exit.
MHC_HD void sinkhorn_exp_row_bwd(const float* M0, float* dM, int ld, int n, int i) {
  for (int j = 0; j < n; ++j) dM[i * ld + j] *= M0[i * ld + j];
}

// Gate gradients of row i: ∂h̃_pre[i] and ∂h̃_post[i] from ∂H and H.
MHC_HD float pre_gate_bwd(float grad_h, float h) { return grad_h * h * (1.0f - h); }
MHC_HD float post_gate_bwd(float grad_h, float h, float post_mult) {
  return grad_h * h * (1.0f - h / post_mult);
}

// One token's coefficient backward, sequentially (one thread; the warp form,
// coefficients_backward in token_backward.cuh, runs the same steps with lane i on row i
// or column i, so each value is bitwise the same): the forward recomputed from the logits
// (z null: static H from the bias) with every Sinkhorn step's divisors kept in div
// (2·iters·n floats), then the iterations walked back. grad_h_* are the upstream ∂H, any
// may be null (zero). h_pre, h_post [n] and M, dM [n rows, leading dim ld] are the
// caller's scratch; on return h_pre, h_post hold H and dlogits [n² + 2n] holds ∂h̃.
MHC_HD void token_coefficients_backward(int n, const float* z, float r, const float* alpha,
                                        const float* bias, float post_mult, int iters, float eps_sk,
                                        const float* grad_h_pre, const float* grad_h_post,
                                        const float* grad_h_res, float* h_pre, float* h_post,
                                        float* M, float* dM, int ld, float* div, float* dlogits) {
  float max_logit = -__builtin_inff();
  for (int i = 0; i < n; ++i) {
    const float row_max = coefficient_row(i, n, z, r, alpha, bias, post_mult, h_pre, h_post, M, ld);
    max_logit = max_logit > row_max ? max_logit : row_max;
  }
  for (int i = 0; i < n; ++i) sinkhorn_exp_row(M, ld, n, i, max_logit);
  for (int it = 0; it < iters; ++it) {
    for (int j = 0; j < n; ++j) div[(2 * it) * n + j] = sinkhorn_col_step(M, ld, n, j, eps_sk);
    for (int i = 0; i < n; ++i) div[(2 * it + 1) * n + i] = sinkhorn_row_step(M, ld, n, i, eps_sk);
  }
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) dM[i * ld + j] = grad_h_res ? grad_h_res[i * n + j] : 0.0f;
  for (int it = iters - 1; it >= 0; --it) {
    for (int i = 0; i < n; ++i) sinkhorn_row_step_bwd(M, dM, ld, n, i, div[(2 * it + 1) * n + i]);
    for (int j = 0; j < n; ++j) sinkhorn_col_step_bwd(M, dM, ld, n, j, div[(2 * it) * n + j]);
  }
  for (int i = 0; i < n; ++i) {
    sinkhorn_exp_row_bwd(M, dM, ld, n, i);
    dlogits[i] = pre_gate_bwd(grad_h_pre ? grad_h_pre[i] : 0.0f, h_pre[i]);
    dlogits[n + i] = post_gate_bwd(grad_h_post ? grad_h_post[i] : 0.0f, h_post[i], post_mult);
    for (int j = 0; j < n; ++j) dlogits[2 * n + i * n + j] = dM[i * ld + j];
  }
}

}  // namespace mhc
