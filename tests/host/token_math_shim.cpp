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

// ∂h̃ of one token's H from upstream ∂H: its logits from z (null: static H, logits =
// bias), the forward recomputed with its divisors recorded, then the iterations walked back
// (token_coefficients_backward, which the GPU's thread form runs as it is).
void shim_coefficients_backward(const float* z, float r, const float* alpha, const float* bias,
                                int n, float post_mult, int iters, float eps_sk,
                                const float* grad_h_pre, const float* grad_h_post,
                                const float* grad_h_res, float* grad_logits) {
  float h_pre[32], h_post[32], M[32 * 32], dM[32 * 32], div[2 * 64 * 32];
  mhc::token_coefficients_backward(n, z, r, alpha, bias, post_mult, iters, eps_sk, grad_h_pre,
                                   grad_h_post, grad_h_res, h_pre, h_post, M, dM, n, div,
                                   grad_logits);
}

void shim_bf16_round(const float* in, float* out, int count) {
  for (int i = 0; i < count; ++i) out[i] = mhc::to_float(mhc::from_float<mhc::bf16>(in[i]));
}
}
