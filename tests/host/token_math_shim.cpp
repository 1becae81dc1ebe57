// Host build of the kernels' per-token math, for tests/test_token_math.py.
// The loops over i and j stand in for the GPU's lanes: same functions, same order.
#include "mhc/token_math.h"

extern "C" {

float shim_token_rms(float sum_sq, long long count, float eps) {
  return mhc::token_rms(sum_sq, count, eps);
}

// One token's H_pre, H_post, H_res from its logits z (null: static H from bias).
void shim_coefficients(const float* z, float r, const float* alpha, const float* bias, int n,
                       float post_mult, int iters, float eps_sk, float* h_pre, float* h_post,
                       float* h_res) {
  float max_logit = -__builtin_inff();
  for (int i = 0; i < n; ++i) {
    const float row_max =
        mhc::coefficient_row(i, n, z, r, alpha, bias, post_mult, h_pre, h_post, h_res, n);
    max_logit = max_logit > row_max ? max_logit : row_max;
  }
  for (int i = 0; i < n; ++i) mhc::sinkhorn_exp_row(h_res, n, n, i, max_logit);
  for (int it = 0; it < iters; ++it) {
    for (int j = 0; j < n; ++j) mhc::sinkhorn_col_step(h_res, n, n, j, eps_sk);
    for (int i = 0; i < n; ++i) mhc::sinkhorn_row_step(h_res, n, n, i, eps_sk);
  }
}

// ∂h̃ of one static H (logits = bias) from upstream ∂H: the forward recomputed
// with its divisors recorded, then the iterations walked back (as the GPU does).
void shim_coefficients_backward(const float* bias, int n, float post_mult, int iters, float eps_sk,
                                const float* grad_h_pre, const float* grad_h_post,
                                const float* grad_h_res, float* grad_logits) {
  float h_pre[32], h_post[32], M[32 * 32], dM[32 * 32], div[2 * 64 * 32];
  const float alpha[3] = {0.0f, 0.0f, 0.0f};
  float max_logit = -__builtin_inff();
  for (int i = 0; i < n; ++i) {
    const float m =
        mhc::coefficient_row(i, n, nullptr, 1.0f, alpha, bias, post_mult, h_pre, h_post, M, n);
    max_logit = max_logit > m ? max_logit : m;
  }
  for (int i = 0; i < n; ++i) mhc::sinkhorn_exp_row(M, n, n, i, max_logit);
  for (int it = 0; it < iters; ++it) {
    for (int j = 0; j < n; ++j) div[(2 * it) * n + j] = mhc::sinkhorn_col_step(M, n, n, j, eps_sk);
    for (int i = 0; i < n; ++i)
      div[(2 * it + 1) * n + i] = mhc::sinkhorn_row_step(M, n, n, i, eps_sk);
  }
  for (int k = 0; k < n * n; ++k) dM[k] = grad_h_res[k];
  for (int it = iters - 1; it >= 0; --it) {
    for (int i = 0; i < n; ++i)
      mhc::sinkhorn_row_step_bwd(M, dM, n, n, i, div[(2 * it + 1) * n + i]);
    for (int j = 0; j < n; ++j) mhc::sinkhorn_col_step_bwd(M, dM, n, n, j, div[(2 * it) * n + j]);
  }
  for (int i = 0; i < n; ++i) {
    mhc::sinkhorn_exp_row_bwd(M, dM, n, n, i);
    grad_logits[i] = mhc::pre_gate_bwd(grad_h_pre[i], h_pre[i]);
    grad_logits[n + i] = mhc::post_gate_bwd(grad_h_post[i], h_post[i], post_mult);
    for (int j = 0; j < n; ++j) grad_logits[2 * n + i * n + j] = dM[i * n + j];
  }
}

void shim_bf16_round(const float* in, float* out, int count) {
  for (int i = 0; i < count; ++i) out[i] = mhc::to_float(mhc::from_float<mhc::bf16>(in[i]));
}
}
