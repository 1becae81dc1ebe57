// The backward kernel family. Per token it mirrors token_kernel.cuh:
//
//   post_bwd   ∂y = H_postᵀ·G, ∂x = H_resᵀ·G, ∂H_post = G·y, ∂H_res = G·xᵀ
//   pre_bwd    ∂H_pre = ∂u·xᵀ and ∂x = H_pre·∂u (one kernel for static H). Dynamic H:
//              a token kernel (∂H_pre, then the exact Sinkhorn backward recomputed
//              from the saved z and r, a warp a token) and a ∂x kernel,
//              ∂x = H_pre·∂u + ∂z·φᵀ + ∂r·x̄/(nC·r), ∂z·φᵀ on tensor cores on CUDA
//   coeffs_bwd the static H's ∂b from token-summed ∂H (one warp)
//   phi_grad   ∂φ = Σ_t x̄_tᵀ·∂z_t, tokens split in fixed chunks
//
// Every reduction has a fixed order (warp shuffles, then warps in index
// order, then tokens in index order): gradients are bitwise reproducible.
#pragma once

#include "token_kernel.cuh"

namespace mhc {

// Each warp's sum of v[k] into partial[warp][k]; ends with a block barrier.
template <int K>
MHC_DEV void warp_partials(const float (&v)[K], float (*partial)[K]) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float w = warp_sum(v[k]);
    if (lane == 0) partial[warp][k] = w;
  }
  __syncthreads();
}

// Σ over warps, in warp order, of partial[·][k].
template <int K>
MHC_DEV float sum_partials(const float (*partial)[K], int k) {
  float acc = 0.0f;
  for (int w = 0; w < kWarps; ++w) acc += partial[w][k];
  return acc;
}

// Sums v[k] over the block for k < count into dst[k]; partial is shared scratch.
template <int K>
MHC_DEV void block_sum_to(const float (&v)[K], float (*partial)[K], float* dst, int count) {
  warp_partials<K>(v, partial);
  for (int k = threadIdx.x; k < count; k += kThreads) dst[k] = sum_partials<K>(partial, k);
  __syncthreads();
}

// One warp: recompute one token's coefficients from its logits (z null: static
// H from the bias), recording the Sinkhorn divisors in scratch, then walk the
// iterations back. grad_h_* are the upstream ∂H (any may be null). On return
// H_pre, H_post sit in h_pre, h_post, and dlogits[0..m) holds ∂h̃.
template <int NB>
MHC_DEV void coefficients_backward(const Args& a, int n, const float* z, float r, float* scratch,
                                   const float* grad_h_pre, const float* grad_h_post,
                                   const float* grad_h_res, float* h_pre, float* h_post,
                                   float (*M)[NB + 1], float (*dM)[NB + 1], float* dlogits) {
  const int lane = threadIdx.x % kWarp;
  constexpr int ld = NB + 1;
  const int iters = a.sinkhorn_iters;
  float row_max = -__builtin_inff();
  if (lane < n)
    row_max = coefficient_row(lane, n, z, r, a.in<float>(kAlpha), a.in<float>(kBias), a.post_mult,
                              h_pre, h_post, &M[0][0], ld);
  const float max_logit = warp_max(row_max);
  if (lane < n) sinkhorn_exp_row(&M[0][0], ld, n, lane, max_logit);
  sync_warp();
  for (int it = 0; it < iters; ++it) {
    if (lane < n) scratch[(2 * it) * n + lane] = sinkhorn_col_step(&M[0][0], ld, n, lane, a.eps_sk);
    sync_warp();
    if (lane < n)
      scratch[(2 * it + 1) * n + lane] = sinkhorn_row_step(&M[0][0], ld, n, lane, a.eps_sk);
    sync_warp();
  }
  if (lane < n)
    for (int j = 0; j < n; ++j) dM[lane][j] = grad_h_res ? grad_h_res[lane * n + j] : 0.0f;
  sync_warp();
  for (int it = iters - 1; it >= 0; --it) {
    if (lane < n)
      sinkhorn_row_step_bwd(&M[0][0], &dM[0][0], ld, n, lane, scratch[(2 * it + 1) * n + lane]);
    sync_warp();
    if (lane < n)
      sinkhorn_col_step_bwd(&M[0][0], &dM[0][0], ld, n, lane, scratch[(2 * it) * n + lane]);
    sync_warp();
  }
  if (lane < n) {
    sinkhorn_exp_row_bwd(&M[0][0], &dM[0][0], ld, n, lane);
    dlogits[lane] = pre_gate_bwd(grad_h_pre ? grad_h_pre[lane] : 0.0f, h_pre[lane]);
    dlogits[n + lane] =
        post_gate_bwd(grad_h_post ? grad_h_post[lane] : 0.0f, h_post[lane], a.post_mult);
    for (int j = 0; j < n; ++j) dlogits[2 * n + lane * n + j] = dM[lane][j];
  }
  sync_warp();
}

// ---------------------------------------------------------------- post

template <int NB, int TM>
struct PostBwdShared {
  float h_post[TM][NB];
  float h_res[TM][NB][NB + 1];
  float partial[kWarps][NB * NB <= 64 ? NB * NB : NB];
  float partial_post[kWarps][NB];
};

template <typename T, int N, int HIDDEN, int TM, bool DYN, int VEC>
__global__ void __launch_bounds__(kThreads) post_bwd_kernel(Args a) {
  constexpr int NB = n_bound<N>();
  constexpr bool kSmallN = NB * NB <= 64;  // ∂H_res accumulated in one pass
  __shared__ PostBwdShared<NB, TM> s;
  const int n = N ? N : a.n;
  const int64_t C = HIDDEN ? HIDDEN : a.hidden;
  const int64_t t0 = int64_t(blockIdx.x) * TM;
  const int nt = a.tokens - t0 < TM ? int(a.tokens - t0) : TM;

  if constexpr (DYN) {
    for (int idx = threadIdx.x; idx < nt * n; idx += kThreads) {
      const int t = idx / n, i = idx % n;
      const int64_t row = (t0 + t) * n + i;
      s.h_post[t][i] = a.in<float>(kHPostIn)[row];
      for (int j = 0; j < n; ++j) s.h_res[t][i][j] = a.in<float>(kHResIn)[row * n + j];
    }
  }
  if constexpr (!DYN) {
    if (const float* h_res = a.in<float>(kHResIn)) {  // computed once by the caller
      for (int idx = threadIdx.x; idx < n * n; idx += kThreads) {
        const int i = idx / n, j = idx % n;
        s.h_res[0][i][j] = h_res[idx];
        if (j == 0) s.h_post[0][i] = a.in<float>(kHPostIn)[i];
      }
    } else {
      // Static H from the logits, by the forward's own code: the same bits.
      __shared__ Shared<NB, 1, 1> hs;
      if (threadIdx.x < kWarp) coefficients<NB, 1, 1>(a, n, 0, nullptr, 1.0f, hs);
      __syncthreads();
      for (int idx = threadIdx.x; idx < n * n; idx += kThreads) {
        const int i = idx / n, j = idx % n;
        s.h_res[0][i][j] = hs.h_res[0][i][j];
        if (j == 0) s.h_post[0][i] = hs.h_post[0][i];
      }
    }
  }
  __syncthreads();

  const T* x = a.in<T>(kX);
  const T* y = a.in<T>(kY);
  const float* y32 = a.in<float>(kYF32);
  const T* g = a.in<T>(kGradOut);
  T* dx = a.out<T>(kGradX);
  T* dy = a.out<T>(kGradY);
  const int64_t token_elems = int64_t(n) * C;
  for (int t = 0; t < nt; ++t) {
    const int hs = DYN ? t : 0;
    const int64_t tok = t0 + t;
    const T* xt = x + tok * token_elems;
    const T* gt = g + tok * token_elems;
    float acc_post[NB];
    float acc_res[kSmallN ? NB * NB : 1];
#pragma unroll
    for (int i = 0; i < NB; ++i) acc_post[i] = 0.0f;
#pragma unroll
    for (int k = 0; k < (kSmallN ? NB * NB : 1); ++k) acc_res[k] = 0.0f;
    for (int64_t c = int64_t(threadIdx.x) * VEC; c < C; c += int64_t(kThreads) * VEC) {
      float gs[NB][VEC], yv[VEC], o[VEC];
      if (y32)
        load_pack<float, VEC>(y32 + tok * C + c, yv);
      else
        load_pack<T, VEC>(y + tok * C + c, yv);
#pragma unroll
      for (int i = 0; i < NB; ++i) {
        if (i < n) load_pack<T, VEC>(gt + i * C + c, gs[i]);
      }
      // ∂y = Σ_i H_post[i]·G[i]
#pragma unroll
      for (int v = 0; v < VEC; ++v) o[v] = 0.0f;
#pragma unroll
      for (int i = 0; i < NB; ++i)
        if (i < n) {
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            o[v] += s.h_post[hs][i] * gs[i][v];
            acc_post[i] += gs[i][v] * yv[v];
          }
        }
      store_pack<T, VEC>(dy + tok * C + c, o);
      // ∂x[j] = Σ_i H_res[i][j]·G[i]
      constexpr int kColUnroll = NB <= 8 ? NB : 1;
#pragma unroll kColUnroll
      for (int j = 0; j < NB; ++j) {
        if (j >= n) break;
        float xv[VEC];
        load_pack<T, VEC>(xt + j * C + c, xv);
#pragma unroll
        for (int v = 0; v < VEC; ++v) o[v] = 0.0f;
#pragma unroll
        for (int i = 0; i < NB; ++i)
          if (i < n) {
#pragma unroll
            for (int v = 0; v < VEC; ++v) o[v] += s.h_res[hs][i][j] * gs[i][v];
          }
        store_pack<T, VEC>(dx + tok * token_elems + j * C + c, o);
        if constexpr (kSmallN) {
#pragma unroll
          for (int i = 0; i < NB; ++i)
            if (i < n) {
#pragma unroll
              for (int v = 0; v < VEC; ++v) acc_res[i * NB + j] += gs[i][v] * xv[v];
            }
        }
      }
    }
    block_sum_to<NB>(acc_post, s.partial_post, a.out<float>(kGradHPost) + tok * n, n);
    if constexpr (kSmallN) {
      // acc_res is indexed (i, j) with row length NB; ∂H_res rows have length n.
      warp_partials<NB * NB>(acc_res, s.partial);
      float* dst = a.out<float>(kGradHRes) + tok * n * n;
      for (int k = threadIdx.x; k < n * n; k += kThreads)
        dst[k] = sum_partials<NB * NB>(s.partial, (k / n) * NB + k % n);
      __syncthreads();
    } else {
      // Large n: one row of ∂H_res per pass over C keeps NB accumulators.
      for (int i = 0; i < n; ++i) {
        float acc[NB];
#pragma unroll
        for (int j = 0; j < NB; ++j) acc[j] = 0.0f;
        for (int64_t c = threadIdx.x; c < C; c += kThreads) {
          const float gi = to_float(gt[i * C + c]);
#pragma unroll
          for (int j = 0; j < NB; ++j)
            if (j < n) acc[j] += gi * to_float(xt[j * C + c]);
        }
        block_sum_to<NB>(acc, s.partial, a.out<float>(kGradHRes) + (tok * n + i) * n, n);
      }
    }
  }
}

// ---------------------------------------------------------------- pre

// One token's state for the coefficient backward (one warp a token).
template <int NB>
struct CoeffBwdShared {
  float h_pre[NB];
  float h_post[NB];
  float grad_h_pre[NB];
  float M[NB][NB + 1];
  float dM[NB][NB + 1];
  float dz[num_logits(NB)];  // ∂h̃
};

// Floats in a token's row of kScratch: the Sinkhorn divisors, 2·iters·n (at least
// 2n, so that the row can then hold H_pre and ∂r for pre's ∂x kernel).
MHC_DEV int64_t scratch_row(const Args& a, int n) {
  return 2 * int64_t(a.sinkhorn_iters > 1 ? a.sinkhorn_iters : 1) * n;
}

// Tokens (warps) a block of pre's token kernel: as many as 40 KB of shared memory holds.
template <int NB>
MHC_CX int pre_token_warps() {
  const int fit = int(40 * 1024 / sizeof(CoeffBwdShared<NB>));
  return fit < 1 ? 1 : fit < kWarps ? fit : kWarps;
}

// Pre's backward with dynamic H, part 1: one warp a token, so no block barrier waits on
// the Sinkhorn walk and the loads of other warps keep the memory pipe busy.
//   ∂H_pre[j] = ⟨∂u, x[j]⟩ (+ the upstream ∂H_pre), then the coefficient backward:
//   ∂h̃, ∂z = α_g·∂h̃/r and ∂α per token; H_pre and ∂r/(n·C·r) go to the token's
//   scratch row for part 2.
template <typename T, int N, int HIDDEN, int VEC>
__global__ void __launch_bounds__(pre_token_warps<n_bound<N>()>() * kWarp)
    pre_bwd_token_kernel(Args a) {
  constexpr int NB = n_bound<N>();
  __shared__ CoeffBwdShared<NB> shared[pre_token_warps<NB>()];
  const int n = N ? N : a.n;
  const int m = num_logits(n);
  const int64_t C = HIDDEN ? HIDDEN : a.hidden;
  const int64_t K = int64_t(n) * C;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t tok = int64_t(blockIdx.x) * pre_token_warps<NB>() + warp;
  if (tok >= a.tokens) return;  // the whole warp: nothing below waits on other warps
  CoeffBwdShared<NB>& s = shared[warp];

  float acc[NB];
#pragma unroll
  for (int j = 0; j < NB; ++j) acc[j] = 0.0f;
  if (const T* du = a.in<T>(kGradOut)) {
    const T* xt = a.in<T>(kX) + tok * K;
    const T* dut = du + tok * C;
#pragma unroll 2
    for (int64_t c = int64_t(lane) * VEC; c < C; c += int64_t(kWarp) * VEC) {
      float g[VEC];
      load_pack_ro<T, VEC>(dut + c, g);
#pragma unroll
      for (int j = 0; j < NB; ++j)
        if (j < n) {
          float xv[VEC];
          load_pack_ro<T, VEC>(xt + j * C + c, xv);
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[j] += g[v] * xv[v];
        }
    }
  }
  const float* ext = a.in<float>(kGradHPreIn);
  float* dh_pre = a.out<float>(kGradHPre);
#pragma unroll
  for (int j = 0; j < NB; ++j) {
    if (j < n) {  // not a break: a loop with an exit and shuffles is not unrolled on ROCm
      const float total = warp_sum(acc[j]);
      if (lane == 0) {
        if (dh_pre) dh_pre[tok * n + j] = total;
        // Upstream ∂H_pre (the caller used H_pre directly) adds to the one through u.
        s.grad_h_pre[j] = ext ? total + ext[tok * n + j] : total;
      }
    }
  }
  sync_warp();

  const float* z = a.in<float>(kZIn) + tok * m;
  const float r = a.in<float>(kRIn)[tok];
  const float* ghp = a.in<float>(kGradHPostIn);
  const float* ghr = a.in<float>(kGradHResIn);
  float* scratch = a.out<float>(kScratch) + tok * scratch_row(a, n);
  coefficients_backward<NB>(a, n, z, r, scratch, s.grad_h_pre, ghp ? ghp + tok * n : nullptr,
                            ghr ? ghr + tok * n * n : nullptr, s.h_pre, s.h_post, s.M, s.dM, s.dz);
  // ∂h̃ out; ∂z = α_g·∂h̃/r; ∂α_g = Σ_{k∈g} ∂h̃_k·z_k/r; ∂r = −Σ_g α_g·∂α_g/r.
  const float* alpha = a.in<float>(kAlpha);
  float* dz_out = a.out<float>(kGradZ);
  float da[3] = {0.0f, 0.0f, 0.0f};
  const float inv_r = 1.0f / r;
  for (int k = lane; k < m; k += kWarp) {
    const float dl = s.dz[k];
    a.out<float>(kGradLogits)[tok * m + k] = dl;
    const int grp = logit_kind(k, n);
    da[grp] += dl * z[k] * inv_r;
    if (dz_out) dz_out[tok * m + k] = alpha[grp] * dl * inv_r;
  }
#pragma unroll
  for (int grp = 0; grp < 3; ++grp) da[grp] = warp_sum(da[grp]);
  // The divisors are spent (coefficients_backward ends on a warp barrier): the row now
  // carries H_pre and the factor of x̄ in ∂x̄ to the ∂x kernel.
  if (lane < n) scratch[lane] = s.h_pre[lane];
  if (lane == 0) {
    const float dr = -(alpha[0] * da[0] + alpha[1] * da[1] + alpha[2] * da[2]) * inv_r;
    scratch[n] = dr / (float(K) * r);
    if (float* dat = a.out<float>(kGradAlphaTok))
      for (int grp = 0; grp < 3; ++grp) dat[tok * 3 + grp] = da[grp];
  }
}

template <int NB>
MHC_CX int padded_logits() {
  return (num_logits(NB) + 3) / 4 * 4;
}

// ∂x̄_k = H_pre[j]·∂u[c] (+ Σ_q φ[k][q]·∂z[q] + ∂r·x̄_k/(nC·r) for dynamic H) (+ ∂x from
// another path) for the block's nt tokens from t0. Each thread owns KV consecutive k; the
// TM tokens share every φ load. Fast path: φᵀ, so that a warp's loads of one logit's row
// are one contiguous 512-byte run (φ's own rows, 4·m floats apart per lane, were not).
// h_pre has one row for static H; dz and dr are read for dynamic H only.
template <typename T, int NB, int TM, bool DYN, int VEC>
MHC_DEV void pre_dx(const Args& a, int n, int64_t C, int64_t t0, int nt, const float (*h_pre)[NB],
                    const float (*dz)[padded_logits<NB>()], const float* dr) {
  const int m = num_logits(n);
  const int64_t K = int64_t(n) * C;
  const T* x = a.in<T>(kX) + t0 * K;
  const T* du = a.in<T>(kGradOut);
  T* dx = a.out<T>(kGradX) + t0 * K;
  const T* dx_in = a.in<T>(kGradXIn);
  if (dx_in) dx_in += t0 * K;
  const float* phi = a.in<float>(kPhi);
  const float* phi_t = a.in<float>(kPhiT);
  // With VEC > 1 (C a multiple of it, pointers aligned) a thread's KV = VEC k lie in
  // one stream: its loads and stores of x, ∂u and ∂x are single vector accesses.
  constexpr int KV = DYN ? 4 : VEC;
  static_assert(VEC == 1 || VEC == KV, "vector accesses cover a thread's k");
  const bool quads =
      DYN && phi_t && m % 4 == 0 && K % 4 == 0 && reinterpret_cast<uintptr_t>(phi_t) % 16 == 0;
  for (int64_t k0 = int64_t(threadIdx.x) * KV; k0 < K; k0 += int64_t(kThreads) * KV) {
    float acc[TM][KV];
#pragma unroll
    for (int t = 0; t < TM; ++t)
#pragma unroll
      for (int v = 0; v < KV; ++v) acc[t][v] = 0.0f;
    if constexpr (DYN) {
      if (quads && k0 + KV <= K) {
        static_assert(!DYN || KV == 4, "the φᵀ path moves four k per 16-byte load");
        for (int q = 0; q < m; q += 4) {
          float4 p[4];  // φᵀ[q + i][k0 .. k0 + 3]
#pragma unroll
          for (int i = 0; i < 4; ++i)
            p[i] = *reinterpret_cast<const float4*>(phi_t + int64_t(q + i) * K + k0);
#pragma unroll
          for (int t = 0; t < TM; ++t)
            if (t < nt) {
              const float4 d = *reinterpret_cast<const float4*>(&dz[t][q]);
              acc[t][0] += p[0].x * d.x + p[1].x * d.y + p[2].x * d.z + p[3].x * d.w;
              acc[t][1] += p[0].y * d.x + p[1].y * d.y + p[2].y * d.z + p[3].y * d.w;
              acc[t][2] += p[0].z * d.x + p[1].z * d.y + p[2].z * d.z + p[3].z * d.w;
              acc[t][3] += p[0].w * d.x + p[1].w * d.y + p[2].w * d.z + p[3].w * d.w;
            }
        }
      } else {
#pragma unroll
        for (int v = 0; v < KV; ++v)
          if (k0 + v < K)
            for (int q = 0; q < m; ++q) {
              const float p = phi[(k0 + v) * m + q];
#pragma unroll
              for (int t = 0; t < TM; ++t)
                if (t < nt) acc[t][v] += p * dz[t][q];
            }
      }
    }
    if (VEC > 1 && k0 + KV <= K) {
      const int j = int(k0 / C);
      const int64_t c = k0 - int64_t(j) * C;
#pragma unroll
      for (int t = 0; t < TM; ++t) {
        if (t >= nt) continue;
        const int hs = DYN ? t : 0;
        float g[KV], in[KV];
#pragma unroll
        for (int v = 0; v < KV; ++v) g[v] = DYN ? acc[t][v] : 0.0f;
        if (du) {
          load_pack_ro<T, KV>(du + (t0 + t) * C + c, in);
#pragma unroll
          for (int v = 0; v < KV; ++v) g[v] += h_pre[hs][j] * in[v];
        }
        if constexpr (DYN) {
          load_pack_ro<T, KV>(x + t * K + k0, in);
#pragma unroll
          for (int v = 0; v < KV; ++v) g[v] += dr[t] * in[v];
        }
        if (dx_in) {
          load_pack_ro<T, KV>(dx_in + t * K + k0, in);
#pragma unroll
          for (int v = 0; v < KV; ++v) g[v] += in[v];
        }
        store_pack<T, KV>(dx + t * K + k0, g);
      }
      continue;
    }
#pragma unroll
    for (int v = 0; v < KV; ++v) {
      const int64_t k = k0 + v;
      if (k >= K) continue;
      const int j = int(k / C);
      const int64_t c = k - int64_t(j) * C;
#pragma unroll
      for (int t = 0; t < TM; ++t) {
        if (t >= nt) continue;
        const int hs = DYN ? t : 0;
        float g = du ? h_pre[hs][j] * to_float(du[(t0 + t) * C + c]) : 0.0f;
        if constexpr (DYN) g += acc[t][v] + dr[t] * to_float(x[t * K + k]);
        if (dx_in) g += to_float(dx_in[t * K + k]);
        dx[t * K + k] = from_float<T>(g);
      }
    }
  }
}

template <int NB, int TM>
struct PreDxShared {
  float h_pre[TM][NB];
  alignas(16) float dz[TM][padded_logits<NB>()];
  float dr[TM];
};

// ∂z, H_pre and ∂r/(n·C·r) of nt tokens from t0 (the token kernel's outputs) to shared.
template <int NB, int TM>
MHC_DEV void load_dx_inputs(const Args& a, int n, int64_t t0, int nt, PreDxShared<NB, TM>& s) {
  const int m = num_logits(n);
  const float* scratch = a.in<float>(kScratch);
  const int64_t row = scratch_row(a, n);
  for (int k = threadIdx.x; k < nt * m; k += kThreads)
    s.dz[k / m][k % m] = a.in<float>(kGradZ)[t0 * m + k];
  for (int k = threadIdx.x; k < nt * (n + 1); k += kThreads) {
    const int t = k / (n + 1), j = k % (n + 1);
    const float v = scratch[(t0 + t) * row + j];
    if (j < n)
      s.h_pre[t][j] = v;
    else
      s.dr[t] = v;
  }
}

// Pre's backward with dynamic H, part 2: ∂x for TM tokens a block from part 1's outputs.
template <typename T, int N, int HIDDEN, int TM, int VEC>
__global__ void __launch_bounds__(kThreads) pre_bwd_dx_kernel(Args a) {
  constexpr int NB = n_bound<N>();
  __shared__ PreDxShared<NB, TM> s;
  const int n = N ? N : a.n;
  const int m = num_logits(n);
  const int64_t C = HIDDEN ? HIDDEN : a.hidden;
  const int64_t t0 = int64_t(blockIdx.x) * TM;
  const int nt = a.tokens - t0 < TM ? int(a.tokens - t0) : TM;
  load_dx_inputs<NB, TM>(a, n, t0, nt, s);
  __syncthreads();
  pre_dx<T, NB, TM, true, VEC>(a, n, C, t0, nt, s.h_pre, s.dz, s.dr);
}

// Pre's backward with dynamic H, part 2 for large n: ∂x = G + H_pre·∂u + ∂r·x̄ (+ ∂x_in),
// with G = ∂z·φᵀ from a GEMM (fp32 [T, n, C]) and H_pre, ∂r from part 1's scratch rows: one
// pass over [T, n, C] in place of the elementwise torch ops after the GEMM. A block a token,
// VEC consecutive channels of one stream a thread and step (C is a multiple of VEC).
template <typename T, int N, int HIDDEN, int VEC>
__global__ void __launch_bounds__(kThreads) pre_bwd_dx_gemm_kernel(Args a) {
  const int n = N ? N : a.n;
  const int64_t C = HIDDEN ? HIDDEN : a.hidden;
  const int64_t tok = blockIdx.x;
  const int64_t K = int64_t(n) * C;
  const float* coef = a.in<float>(kScratch) + tok * scratch_row(a, n);  // H_pre[0..n), ∂r
  const float dr = coef[n];
  const float* g = a.in<float>(kGradXGemm) + tok * K;
  const T* x = a.in<T>(kX) + tok * K;
  const T* du = a.in<T>(kGradOut);
  const T* dx_in = a.in<T>(kGradXIn);
  T* dx = a.out<T>(kGradX) + tok * K;
  for (int j = 0; j < n; ++j) {
    const float h = coef[j];
    for (int64_t c = int64_t(threadIdx.x) * VEC; c < C; c += int64_t(kThreads) * VEC) {
      const int64_t k = j * C + c;
      float v[VEC], in[VEC];
      load_pack_ro<float, VEC>(g + k, v);
      if (du) {
        load_pack_ro<T, VEC>(du + tok * C + c, in);
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] += h * in[e];
      }
      load_pack_ro<T, VEC>(x + k, in);
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[e] += dr * in[e];
      if (dx_in) {
        load_pack_ro<T, VEC>(dx_in + tok * K + k, in);
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] += in[e];
      }
      store_pack<T, VEC>(dx + k, v);
    }
  }
}

// Pre's token kernel a token a thread where there is no ∂u to reduce (the dynamic layer's
// backward hands ∂H_pre in): compile-time n ≤ kThreadCoeffsMaxN, at most kThreadBwdMaxIters
// Sinkhorn iterations (their divisors in local memory). Bitwise the warp form's outputs: the
// same steps (token_coefficients_backward), and ∂α summed in the warp form's order (lane
// l's logits l, l + 32, … ascending, then the shuffle tree, emulated). The warp form keeps
// 28 of 32 lanes idle at n = 4 (0.130 ms for 16,384 tokens).
constexpr int kThreadBwdMaxIters = 32;

// A thread's row of W floats of a [T, W] input (zeros where src is null or past T), through the
// block's shared rows (coeffs_thread_kernel's): each load instruction a warp's consecutive bytes
// (pre's token backward at 16,384 tokens, n = 4: 25.1 → 16.1 µs, H200 session 24).
template <int W, int RP>
MHC_DEV void own_row(const float* src, int64_t t0, int nt, float (&rows)[kThreadCoeffsBlock][RP],
                     float (&v)[W]) {
  static_assert(W < RP, "the shared rows hold the widest");
  if (!src) {
#pragma unroll
    for (int k = 0; k < W; ++k) v[k] = 0.0f;
    return;
  }
  auto& view = reinterpret_cast<BlockRows<W>&>(rows);
  float share[W];
  rows_from<W>(src, t0, nt, 1, 0, view, share);
#pragma unroll
  for (int k = 0; k < W; ++k) v[k] = view[threadIdx.x][k];
  __syncthreads();  // everyone has its row before the next one overwrites them
}

template <int N>
__global__ void __launch_bounds__(kThreadCoeffsBlock) pre_bwd_token_thread_kernel(Args a) {
  constexpr int m = num_logits(N);
  __shared__ BlockRows<m> rows;
  const int64_t t0 = int64_t(blockIdx.x) * kThreadCoeffsBlock;
  const int nt = int(a.tokens - t0 < kThreadCoeffsBlock ? a.tokens - t0 : kThreadCoeffsBlock);
  const int64_t tok = t0 + threadIdx.x;
  const bool live = threadIdx.x < nt;  // rows past T run on zeros and are never stored
  float z[m], h_pre[N], h_post[N], M[N * N], dM[N * N], dl[m];
  float div[2 * kThreadBwdMaxIters * N];
  own_row<m>(a.in<float>(kZIn), t0, nt, rows, z);
  const float r = live ? a.in<float>(kRIn)[tok] : 1.0f;
  // ∂H_pre: the warp form's ⟨∂u, x⟩ (zero: no ∂u) plus the upstream one, as it adds them.
  float ghp[N], ghq[N], ghr[N * N];
  own_row<N>(a.in<float>(kGradHPreIn), t0, nt, rows, ghp);
#pragma unroll
  for (int j = 0; j < N; ++j) ghp[j] = 0.0f + ghp[j];
  const bool has_q = a.in<float>(kGradHPostIn) != nullptr;
  const bool has_r = a.in<float>(kGradHResIn) != nullptr;
  own_row<N>(a.in<float>(kGradHPostIn), t0, nt, rows, ghq);
  own_row<N * N>(a.in<float>(kGradHResIn), t0, nt, rows, ghr);
  if (float* dh_pre = a.out<float>(kGradHPre))
    for (int e = threadIdx.x; e < nt * N; e += kThreadCoeffsBlock) dh_pre[t0 * N + e] = 0.0f;
  const float* alpha = a.in<float>(kAlpha);
  token_coefficients_backward(N, z, r, alpha, a.in<float>(kBias), a.post_mult, a.sinkhorn_iters,
                              a.eps_sk, ghp, has_q ? ghq : nullptr, has_r ? ghr : nullptr, h_pre,
                              h_post, M, dM, N, div, dl);
  const float inv_r = 1.0f / r;
  float da[3];
#pragma unroll
  for (int grp = 0; grp < 3; ++grp) {
    float part[kWarp];  // lane l's sum in the warp form
#pragma unroll
    for (int l = 0; l < kWarp; ++l) part[l] = 0.0f;
#pragma unroll
    for (int k = 0; k < m; ++k) {
      if (logit_kind(k, N) != grp) continue;
      part[k % kWarp] += dl[k] * z[k] * inv_r;
    }
#pragma unroll
    for (int o = kWarp / 2; o > 0; o /= 2)
#pragma unroll
      for (int l = 0; l < o; ++l) part[l] += part[l + o];
    da[grp] = part[0];
  }
  put_rows<m>(a.out<float>(kGradLogits), t0, nt, rows, dl);
  if (float* dz_out = a.out<float>(kGradZ)) {
    float dz[m];
#pragma unroll
    for (int k = 0; k < m; ++k) dz[k] = alpha[logit_kind(k, N)] * dl[k] * inv_r;
    put_rows<m>(dz_out, t0, nt, rows, dz);
  }
  if (!live) return;
  float* scratch = a.out<float>(kScratch) + tok * scratch_row(a, N);
#pragma unroll
  for (int j = 0; j < N; ++j) scratch[j] = h_pre[j];
  const float dr = -(alpha[0] * da[0] + alpha[1] * da[1] + alpha[2] * da[2]) * inv_r;
  scratch[N] = dr / (float(int64_t(N) * a.hidden) * r);
  if (float* dat = a.out<float>(kGradAlphaTok))
#pragma unroll
    for (int grp = 0; grp < 3; ++grp) dat[tok * 3 + grp] = da[grp];
}

#if defined(MHC_CUDA)
// ∂x on tensor cores (CUDA, n ≤ 8): ∂z·φᵀ for 16 tokens as mma.sync m16n8k16 products
// of bf16 operands split into hi + lo (∂z·φᵀ ≈ ∂z_hi·φ_hi + ∂z_hi·φ_lo + ∂z_lo·φ_hi, fp32
// accumulate: the GEMM path's precision), in place of m FMAs per element on CUDA cores.

// pre's ∂x kernel runs on tensor cores for n ≤ 8, where its operand fragments (m/16
// k-steps of ∂z) stay in registers; larger n take the GEMM path on CUDA.
constexpr int kMmaMaxN = 8;

// The streams a tensor-core ∂x variant for N is compiled for (N = 0: any n up to kMmaMaxN;
// its launcher checks n).
template <int N>
MHC_CX int mma_bound() {
  return n_bound<N>() < kMmaMaxN ? n_bound<N>() : kMmaMaxN;
}

constexpr int kMmaTokens = 16;             // the m16 of the tile
constexpr int kMmaK = 64;                  // c per warp and pass: eight n8 tiles
constexpr int kMmaChunk = kWarps * kMmaK;  // c per block (grid.y splits C)

// The A fragments (m16 × k16, KS k-steps) of 16 tokens' ∂z (rows dz[t][·] in shared
// memory), split into bf16 hi + lo; rows past nt and logits past m are zero.
template <int KS, int LD>
MHC_DEV void dz_fragments(const float (*dz)[LD], int nt, int m, int g, int c2,
                          uint32_t (&a_hi)[KS][4], uint32_t (&a_lo)[KS][4]) {
#pragma unroll
  for (int st = 0; st < KS; ++st)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int row = g + (r & 1) * 8, col = 16 * st + c2 + (r >> 1) * 8;
      const bool live = row < nt;
      split_pair(live && col < m ? dz[row][col] : 0.0f,
                 live && col + 1 < m ? dz[row][col + 1] : 0.0f, a_hi[st][r], a_lo[st][r]);
    }
}

// φ's bf16 hi and lo (split_pair's bits), split once a call into the order the ∂x
// kernels' B fragments take them: row k of φ (a column of x), k-step st <
// phi_fragment_steps(m) and lane quad c4 hold the words hi(q, q + 1), hi(q + 8, q + 9),
// lo(q, q + 1), lo(q + 8, q + 9) with q = 16·st + 2·c4, zeros past m. A lane then loads a
// k-step's fragments as one 16-byte word. Split from fp32 φ once a token tile, they took
// half of the two-pass ∂x kernel's instructions (session 20's SASS).
MHC_CX int phi_fragment_steps(int m) { return (m + 15) / 16; }

template <int NB>  // a template only so that each variant's object holds its own copy
__global__ void __launch_bounds__(kThreads) phi_fragments_kernel(Args a) {
  const int m = num_logits(a.n), quads = phi_fragment_steps(m) * 4;  // 16 bytes each
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;    // (row, st, c4)
  if (i >= int64_t(a.n) * a.hidden * quads) return;
  const int64_t k = i / quads;
  const int q = 16 * (int(i % quads) / 4) + 2 * int(i % 4);
  const float* row = a.in<float>(kPhi) + k * m;
  float f[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int qe = q + (e / 2) * 8 + e % 2;
    f[e] = qe < m ? row[qe] : 0.0f;
  }
  uint4 w;
  split_pair(f[0], f[1], w.x, w.z);
  split_pair(f[2], f[3], w.y, w.w);
  reinterpret_cast<uint4*>(a.out<uint32_t>(kPhiFragments))[i] = w;
}

// φ's a.n·a.hidden rows into kPhiFragments, before a ∂x kernel that reads them.
template <int NB>
int launch_phi_fragments(const Args& a, stream_t stream) {
  if (!a.p[kPhi] || !a.p[kPhiFragments]) return kMissingInput;
  if (!aligned_to(a.p[kPhiFragments], 16)) return kUnsupported;
  const int64_t quads = int64_t(a.n) * a.hidden * phi_fragment_steps(num_logits(a.n)) * 4;
  if (quads == 0) return kOk;
  phi_fragments_kernel<NB><<<unsigned((quads + kThreads - 1) / kThreads), kThreads, 0, stream>>>(a);
  return int(last_error());
}

// d += one n8 tile of ∂z·φᵀ for 16 tokens: three bf16 products of split operands over the
// k-steps that hold logits (steps of KS; compile-time where N is). `frag` is this lane's
// row k of φ's fragments (column g of the tile) at its quad; it exists even where the
// column is past C (live false: row 0, zeroed), so the loads take no branch.
template <int KS>
MHC_DEV void dz_phi_fragments_n8(const uint4* frag, int steps, bool live,
                                 const uint32_t (&a_hi)[KS][4], const uint32_t (&a_lo)[KS][4],
                                 float (&d)[4]) {
#pragma unroll
  for (int st = 0; st < KS; ++st) {
    if (st >= steps) break;
    uint4 w = __ldg(frag + 4 * st);
    if (!live) w = make_uint4(0u, 0u, 0u, 0u);
    const uint32_t b_hi[2] = {w.x, w.y}, b_lo[2] = {w.z, w.w};
    mma_bf16(d, a_hi[st], b_hi);
    mma_bf16(d, a_hi[st], b_lo);
    mma_bf16(d, a_lo[st], b_hi);
  }
}

template <int NB>
struct PreDxMmaShared {
  PreDxShared<NB, kMmaTokens> in;
  // A warp's 16 × 64 ∂z·φᵀ tile, staged so that the epilogue moves 16-byte vectors of
  // one token's row; +8 keeps the fragment stores (float2, half a warp at a time)
  // free of bank conflicts.
  alignas(16) float tile[kWarps][kMmaTokens][kMmaK + 8];
};

// Dynamic shared memory of pre_bwd_dx_mma_kernel: each warp's epilogue x tile (16 tokens ×
// kMmaK channels) for 16-bit T on sm_90, 16 KB, which keep 4 blocks an SM there (H200: 0.741
// → 0.670 ms at n = 4, T = 16384, C = 4096, bf16; x and ∂x_in both, 32 KB and 3 blocks, 0.83).
// Elsewhere the loads stay in the epilogue (0 bytes): fp32 x would take 32 KB, an A100's 164
// KB an SM would hold 2 such blocks instead of 4, and sm_100 compiles it to 80 registers.
template <typename T>
MHC_CX int64_t dx_mma_prefetch_bytes() {
  return sizeof(T) == 2 && MHC_TARGET_SM == 90
             ? int64_t(kWarps) * kMmaTokens * kMmaK * int64_t(sizeof(T))
             : 0;
}

// pre_bwd_dx_kernel with the ∂z·φᵀ term on tensor cores; VEC = 16 bytes of T (C a
// multiple of VEC and every [T, n, C] pointer 16-byte aligned). Where
// dx_mma_prefetch_bytes gives room (16-bit T on sm_90) each warp's x tile of stream j is
// copied into shared memory (cp.async) before its mma's, so that their DRAM latency passes
// under the φ loads and products instead of after them (the epilogue, unrolled over 4 rows,
// otherwise waits for each row's loads in turn).
template <typename T, int N, int HIDDEN, int VEC>
__global__ void __launch_bounds__(kThreads) pre_bwd_dx_mma_kernel(Args a) {
  constexpr bool kPrefetch = dx_mma_prefetch_bytes<T>() > 0;
  constexpr int NB = mma_bound<N>();
  constexpr int TM = kMmaTokens;
  constexpr int KS = (num_logits(NB) + 15) / 16;  // k-steps of 16 logits
  __shared__ PreDxMmaShared<NB> s;
  const int n = N ? N : a.n;
  const int m = num_logits(n);
  const int64_t C = HIDDEN ? HIDDEN : a.hidden;
  const int64_t K = int64_t(n) * C;
  const int64_t t0 = int64_t(blockIdx.x) * TM;
  const int nt = a.tokens - t0 < TM ? int(a.tokens - t0) : TM;
  load_dx_inputs<NB, TM>(a, n, t0, nt, s.in);
  __syncthreads();

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int g = lane / 4, c2 = 2 * (lane % 4);  // the fragment's row and column pair
  // A: ∂z of the 16 tokens, split once.
  uint32_t a_hi[KS][4], a_lo[KS][4];
  dz_fragments<KS>(s.in.dz, nt, m, g, c2, a_hi, a_lo);

  const uint4* frags = reinterpret_cast<const uint4*>(a.in<uint32_t>(kPhiFragments));
  const int steps = phi_fragment_steps(m);
  const T* x = a.in<T>(kX) + t0 * K;
  const T* du = a.in<T>(kGradOut);
  T* dx = a.out<T>(kGradX) + t0 * K;
  const T* dx_in = a.in<T>(kGradXIn);
  if (dx_in) dx_in += t0 * K;
  float(*tile)[kMmaK + 8] = s.tile[warp];
  // The block owns c in [c_lo, c_lo + kMmaChunk) of every stream j, so its tokens' ∂u
  // rows are read from memory once and reused from cache for each j; and blocks are
  // small enough that the last wave is short.
  const int64_t c_lo = int64_t(blockIdx.y) * kMmaChunk + int64_t(warp) * kMmaK;
  // The epilogue's lane layout: VEC consecutive c of one token, rows lane / kLanesPerRow
  // + i·kRowsPerPass.
  constexpr int kLanesPerRow = kMmaK / VEC;
  constexpr int kRowsPerPass = kWarp / kLanesPerRow;
  const int col = (lane % kLanesPerRow) * VEC;
  const int64_t c = c_lo + col;
  extern __shared__ float4 prefetch_smem[];
  T* px = reinterpret_cast<T*>(prefetch_smem) + warp * kMmaTokens * kMmaK;
  for (int j = 0; j < n; ++j) {
    const int64_t kb = int64_t(j) * C + c_lo;  // the warp's first k
    if constexpr (kPrefetch) {
      if (c < C) {  // each lane copies the 16-byte pieces its epilogue reads, and only those
#pragma unroll
        for (int i = 0; i < kMmaTokens / kRowsPerPass; ++i) {
          const int t = lane / kLanesPerRow + i * kRowsPerPass;
          if (t < nt) async_copy16(px + t * kMmaK + col, x + t * K + kb + col);
        }
      }
      async_commit();
    }
#pragma unroll
    for (int nb = 0; nb < kMmaK / 8; ++nb) {
      const bool live = c_lo + nb * 8 + g < C;
      float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      const int64_t k = live ? kb + nb * 8 + g : int64_t(0);
      dz_phi_fragments_n8<KS>(frags + k * (steps * 4) + c2 / 2, steps, live, a_hi, a_lo, d);
      *reinterpret_cast<float2*>(&tile[g][nb * 8 + c2]) = make_float2(d[0], d[1]);
      *reinterpret_cast<float2*>(&tile[g + 8][nb * 8 + c2]) = make_float2(d[2], d[3]);
    }
    sync_warp();
    if constexpr (kPrefetch) stage_wait();  // this lane's copies (it reads only those)
    // Epilogue: VEC consecutive c of one token a lane; + H_pre[j]·∂u + ∂r·x̄ (+ ∂x_in).
    if (c < C) {  // C is a multiple of VEC: the whole vector is in range
      const int64_t k0 = kb + col;
      // Unrolled over the tile's rows (a predicate, not the loop bound, stops a short
      // tile). Batching all rows' loads before their stores took 128 registers (2 blocks
      // an SM, as session 6's prefetch that lost); this keeps 64 (4 blocks).
#pragma unroll
      for (int i = 0; i < kMmaTokens / kRowsPerPass; ++i) {
        const int t = lane / kLanesPerRow + i * kRowsPerPass;
        if (t >= nt) break;
        float v[VEC], in[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] = tile[t][col + e];
        if (du) {
          load_pack_ro<T, VEC>(du + (t0 + t) * C + c, in);
#pragma unroll
          for (int e = 0; e < VEC; ++e) v[e] += s.in.h_pre[t][j] * in[e];
        }
        if constexpr (kPrefetch)
          load_pack<T, VEC>(px + t * kMmaK + col, in);
        else
          load_pack_ro<T, VEC>(x + t * K + k0, in);
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] += s.in.dr[t] * in[e];
        if (dx_in) {
          load_pack_ro<T, VEC>(dx_in + t * K + k0, in);
#pragma unroll
          for (int e = 0; e < VEC; ++e) v[e] += in[e];
        }
        store_pack<T, VEC>(dx + t * K + k0, v);
      }
    }
    sync_warp();
  }
}

// φ's fragments, then the kernel.
template <typename T, int N, int HIDDEN, int VEC>
int launch_dx_mma(dim3 grid, stream_t stream, const Args& a) {
  if (const int status = launch_phi_fragments<mma_bound<N>()>(a, stream); status != kOk)
    return status;
  return launch_with_smem(pre_bwd_dx_mma_kernel<T, N, HIDDEN, VEC>, grid,
                          size_t(dx_mma_prefetch_bytes<T>()), stream, a);
}
#endif  // MHC_CUDA

template <int NB, int TM>
struct PreStaticBwdShared {
  float h_pre[1][NB];
  float partial[kWarps][TM * NB];
};

// Pre's backward with static H, in one kernel: ∂H_pre[t][j] = ⟨∂u_t, x_t[j]⟩ per token to
// global memory (token-summed later), then ∂x = H_pre·∂u (+ ∂x from another path).
template <typename T, int N, int HIDDEN, int TM, int VEC>
__global__ void __launch_bounds__(kThreads) pre_bwd_static_kernel(Args a) {
  constexpr int NB = n_bound<N>();
  __shared__ PreStaticBwdShared<NB, TM> s;
  const int n = N ? N : a.n;
  const int64_t C = HIDDEN ? HIDDEN : a.hidden;
  const int64_t t0 = int64_t(blockIdx.x) * TM;
  const int nt = a.tokens - t0 < TM ? int(a.tokens - t0) : TM;
  const int64_t K = int64_t(n) * C;
  const T* x = a.in<T>(kX) + t0 * K;
  const T* du = a.in<T>(kGradOut);

  if (du) {
    float acc[TM * NB];
#pragma unroll
    for (int k = 0; k < TM * NB; ++k) acc[k] = 0.0f;
    for (int64_t c = int64_t(threadIdx.x) * VEC; c < C; c += int64_t(kThreads) * VEC) {
#pragma unroll
      for (int t = 0; t < TM; ++t) {
        if (t >= nt) break;
        float g[VEC];
        load_pack_ro<T, VEC>(du + (t0 + t) * C + c, g);
#pragma unroll
        for (int j = 0; j < NB; ++j)
          if (j < n) {
            float xv[VEC];
            load_pack_ro<T, VEC>(x + t * K + j * C + c, xv);
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[t * NB + j] += g[v] * xv[v];
          }
      }
    }
    warp_partials<TM * NB>(acc, s.partial);
    if (float* dh_pre = a.out<float>(kGradHPre))
      for (int k = threadIdx.x; k < nt * n; k += kThreads)
        dh_pre[t0 * n + k] = sum_partials<TM * NB>(s.partial, (k / n) * NB + k % n);
  }
  // Static H_pre: computed once by the caller, or from the logits as the forward does.
  if (const float* h_pre = a.in<float>(kHPreIn)) {
    for (int j = threadIdx.x; j < n; j += kThreads) s.h_pre[0][j] = h_pre[j];
  } else {
    __shared__ Shared<NB, 1, 1> hs;
    if (threadIdx.x < kWarp) coefficients<NB, 1, 1>(a, n, 0, nullptr, 1.0f, hs);
    __syncthreads();
    for (int j = threadIdx.x; j < n; j += kThreads) s.h_pre[0][j] = hs.h_pre[0][j];
  }
  __syncthreads();
  if (a.out<T>(kGradX)) pre_dx<T, NB, TM, false, VEC>(a, n, C, t0, nt, s.h_pre, nullptr, nullptr);
}

// ---------------------------------------------------------------- static coefficients

template <int NB>
__global__ void __launch_bounds__(kThreads) coeffs_bwd_static_kernel(Args a) {
  __shared__ CoeffBwdShared<NB> s;
  const int n = a.n;
  if (threadIdx.x < kWarp) {
    coefficients_backward<NB>(a, n, nullptr, 1.0f, a.out<float>(kScratch), a.in<float>(kGradHPreIn),
                              a.in<float>(kGradHPostIn), a.in<float>(kGradHResIn), s.h_pre,
                              s.h_post, s.M, s.dM, s.dz);
    for (int k = threadIdx.x; k < num_logits(n); k += kWarp) a.out<float>(kGradLogits)[k] = s.dz[k];
  }
}

// ---------------------------------------------------------------- ∂φ

// Block (bx, by): rows [bx·kThreads, +kThreads) of ∂φ over token chunk by;
// out[by] holds that chunk's partial sum (summed over chunks in order later).
template <typename T, int N>
__global__ void __launch_bounds__(kThreads) phi_grad_kernel(Args a) {
  constexpr int NB = n_bound<N>();
  constexpr int G = logit_group<NB>();
  const int n = N ? N : a.n;
  const int m = num_logits(n);
  const int64_t K = int64_t(n) * a.hidden;
  const int64_t k = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t per_chunk = (a.tokens + gridDim.y - 1) / gridDim.y;
  const int64_t t_lo = int64_t(blockIdx.y) * per_chunk;
  const int64_t t_hi = t_lo + per_chunk < a.tokens ? t_lo + per_chunk : a.tokens;
  if (k >= K) return;
  const T* x = a.in<T>(kX);
  const float* dz = a.in<float>(kGradLogitsIn);
  float* out = a.out<float>(kGradPhi) + int64_t(blockIdx.y) * K * m + k * m;
  for (int col0 = 0; col0 < m; col0 += G) {
    float acc[G];
#pragma unroll
    for (int q = 0; q < G; ++q) acc[q] = 0.0f;
    for (int64_t t = t_lo; t < t_hi; ++t) {
      const float xv = to_float(x[t * K + k]);
      const float* dzt = dz + t * m + col0;
#pragma unroll
      for (int q = 0; q < G; ++q)
        if (col0 + q < m) acc[q] += xv * dzt[q];
    }
#pragma unroll
    for (int q = 0; q < G; ++q)
      if (col0 + q < m) out[col0 + q] = acc[q];
  }
}

// ---------------------------------------------------------------- launchers

enum class BwdOp { Post, Pre, Coeffs, PhiGrad, Layer };

// Pre's backward: one kernel for static H; two for dynamic H (the token kernel, then
// the ∂x kernel unless ∂x is not wanted).
template <typename T, int N, int HIDDEN, int TM, bool DYN>
int launch_pre_backward(const Args& a, stream_t stream) {
  const int64_t blocks = (a.tokens + TM - 1) / TM;
  // Four elements per ∂x access (8 bytes of bf16), where C and the pointers allow.
  constexpr int PV = 4;
  const int pb = PV * int(sizeof(T));
  const bool pre_vec = a.hidden % PV == 0 && aligned_to(a.p[kX], pb) &&
                       aligned_to(a.p[kGradOut], pb) && aligned_to(a.p[kGradX], pb) &&
                       aligned_to(a.p[kGradXIn], pb);
  if constexpr (!DYN) {
    if (pre_vec)
      pre_bwd_static_kernel<T, N, HIDDEN, TM, PV><<<unsigned(blocks), kThreads, 0, stream>>>(a);
    else
      pre_bwd_static_kernel<T, N, HIDDEN, TM, 1><<<unsigned(blocks), kThreads, 0, stream>>>(a);
    return kOk;
  } else {
    if (a.p[kGradXGemm]) {  // after the caller's ∂z·φᵀ GEMM: the ∂x epilogue only
      if (!a.p[kGradX] || !a.p[kScratch] || !a.p[kX]) return kMissingInput;
      if (a.tokens == 0) return kOk;
      constexpr int GV = 4;  // 16 bytes of fp32 G
      const bool gemm_vec = a.hidden % GV == 0 && aligned_to(a.p[kGradXGemm], 16) &&
                            aligned_to(a.p[kX], GV * int(sizeof(T))) &&
                            aligned_to(a.p[kGradOut], GV * int(sizeof(T))) &&
                            aligned_to(a.p[kGradX], GV * int(sizeof(T))) &&
                            aligned_to(a.p[kGradXIn], GV * int(sizeof(T)));
      if (gemm_vec)
        pre_bwd_dx_gemm_kernel<T, N, HIDDEN, GV><<<unsigned(a.tokens), kThreads, 0, stream>>>(a);
      else
        pre_bwd_dx_gemm_kernel<T, N, HIDDEN, 1><<<unsigned(a.tokens), kThreads, 0, stream>>>(a);
      return kOk;
    }
    if (a.p[kGradX] && !a.p[kGradZ]) return kMissingInput;  // the ∂x kernel reads ∂z
    bool by_thread = false;
    if constexpr (N > 0 && N <= kThreadCoeffsMaxN) {
      by_thread = !a.p[kGradOut] && a.sinkhorn_iters <= kThreadBwdMaxIters;
      if (by_thread) {
        const unsigned grid = unsigned((a.tokens + kThreadCoeffsBlock - 1) / kThreadCoeffsBlock);
        pre_bwd_token_thread_kernel<N><<<grid, kThreadCoeffsBlock, 0, stream>>>(a);
      }
    }
    if (!by_thread) {
      constexpr int W = pre_token_warps<n_bound<N>()>();
      const unsigned token_blocks = unsigned((a.tokens + W - 1) / W);
      constexpr int TV = 16 / int(sizeof(T));  // 16-byte loads of x and ∂u
      const bool token_vec =
          a.hidden % TV == 0 && aligned_to(a.p[kX], 16) && aligned_to(a.p[kGradOut], 16);
      if (token_vec)
        pre_bwd_token_kernel<T, N, HIDDEN, TV><<<token_blocks, W * kWarp, 0, stream>>>(a);
      else
        pre_bwd_token_kernel<T, N, HIDDEN, 1><<<token_blocks, W * kWarp, 0, stream>>>(a);
    }
    if (!a.p[kGradX]) return kOk;  // the caller forms ∂x with a GEMM from ∂z
#if defined(MHC_CUDA)
    if constexpr (N <= kMmaMaxN) {  // N = 0 (any n): a.n decides
      constexpr int MV = 16 / int(sizeof(T));
      const bool mma_ok = a.n <= kMmaMaxN && a.hidden % MV == 0 && aligned_to(a.p[kX], 16) &&
                          aligned_to(a.p[kGradOut], 16) && aligned_to(a.p[kGradX], 16) &&
                          aligned_to(a.p[kGradXIn], 16);
      const dim3 grid(unsigned((a.tokens + kMmaTokens - 1) / kMmaTokens),
                      unsigned((a.hidden + kMmaChunk - 1) / kMmaChunk));
      if (mma_ok) return launch_dx_mma<T, N, HIDDEN, MV>(grid, stream, a);
    }
#endif
    if (pre_vec)
      pre_bwd_dx_kernel<T, N, HIDDEN, TM, PV><<<unsigned(blocks), kThreads, 0, stream>>>(a);
    else
      pre_bwd_dx_kernel<T, N, HIDDEN, TM, 1><<<unsigned(blocks), kThreads, 0, stream>>>(a);
    return kOk;
  }
}

template <typename T, int N, int HIDDEN, int TM, BwdOp OP, bool DYN>
int launch_backward(const Args& a) {
  if (a.n < 1 || a.n > kMaxN || (N && a.n != N)) return kBadN;
  if (HIDDEN && a.hidden != HIDDEN) return kBadHidden;
  const stream_t stream = static_cast<stream_t>(a.stream);
  const int64_t blocks = (a.tokens + TM - 1) / TM;
  if (OP == BwdOp::Post && !DYN && a.p[kHResIn] && !a.p[kHPostIn])
    return kMissingInput;  // a given static H comes whole
  if constexpr (OP == BwdOp::Coeffs) {
    coeffs_bwd_static_kernel<n_bound<N>()><<<1, kThreads, 0, stream>>>(a);
  } else if constexpr (OP == BwdOp::PhiGrad) {
    const int64_t rows = (int64_t(a.n) * a.hidden + kThreads - 1) / kThreads;
    if (rows == 0 || a.tokens == 0) return kOk;
    const unsigned chunks = unsigned(a.splits < 1 ? 1 : a.splits);
    phi_grad_kernel<T, N><<<dim3(unsigned(rows), chunks), kThreads, 0, stream>>>(a);
  } else {
    if (blocks == 0) return kOk;
    constexpr int VEC = vec_width<T, n_bound<N>()>();
    const int vb = VEC * int(sizeof(T));
    const bool vec_ok = a.hidden % VEC == 0 && aligned_to(a.p[kX], vb) && aligned_to(a.p[kY], vb) &&
                        aligned_to(a.p[kGradOut], vb) && aligned_to(a.p[kGradX], vb) &&
                        aligned_to(a.p[kGradY], vb) && aligned_to(a.p[kYF32], VEC * 4);
    if constexpr (OP == BwdOp::Post) {
      if (vec_ok)
        post_bwd_kernel<T, N, HIDDEN, TM, DYN, VEC><<<unsigned(blocks), kThreads, 0, stream>>>(a);
      else
        post_bwd_kernel<T, N, HIDDEN, TM, DYN, 1><<<unsigned(blocks), kThreads, 0, stream>>>(a);
    } else {
      const int status = launch_pre_backward<T, N, HIDDEN, TM, DYN>(a, stream);
      if (status != kOk) return status;
    }
  }
  return int(last_error());
}

}  // namespace mhc
