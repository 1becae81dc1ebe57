// The seed layer's backward but for the coefficients' own (H from z), in one kernel:
//   x_next = H_res·x + H_postᵀ·y,  y = u·s·w,  u = H_pre·x,  s = 1/rms(u).
// Per token, from x and G = ∂x_next, with H from the caller or the saved z and r (dynamic)
// or the logits (static):
//   pass 1  u into shared memory; Σu² gives s
//   pass 2  y; ∂y = H_postᵀ·G; ∂H_post = G·y (written); g = ∂y·w into shared memory;
//           Σ g·u; ∂w += ∂y·u·s
//   pass 3  ∂u = s·g − u·s³·mean(g·u), never rounded: ∂x = H_resᵀ·G + H_preᵀ·∂u (written),
//           ∂H_res = G·xᵀ and ∂H_pre = ∂u·xᵀ (written). G and x come from L2 again.
// ∂H_pre is a near-cancelling sum (RMSNorm is scale-invariant, so ∂u ⟂ u up to eps): from
// ∂u rounded to bf16 it lost all accuracy at n = 1. The kernel replaces the recompute of u,
// RMSNorm's forward and backward, post's backward and the casts between them, which read
// and wrote [T, C] and [T, n, C] tensors seven times; pre's backward then adds ∂z·φᵀ and
// ∂r·x̄ to ∂x (dynamic H) or is not needed (static H).
//
// A block walks token groups blockIdx.x, + gridDim.x, ...: each thread owns the same
// channels in every pass and token, so u, g and its ∂w partial stay in shared memory
// without barriers, and the block's ∂w row (kGradNormWeight) sums its tokens in order;
// the caller sums the rows in a fixed order. No atomics.
#pragma once

#include "layer_backward_two_pass.cuh"

namespace mhc {

// Floats of dynamic shared memory a block takes: u, g and the ∂w partial, C each
// (rounded up to 4 so that each array starts 16-byte aligned).
MHC_CX int64_t layer_bwd_smem_floats(int64_t C) { return 3 * ((C + 3) / 4 * 4); }

// Blocks an SM the kernel is compiled for (launch bounds' minimum): it is latency-bound
// (three barrier-separated passes a token; ncu, session 8: 0.86 of 3.88 warps eligible at 2
// blocks an SM), so for dynamic H at n ≤ 4 its registers are capped at 80 for 3 blocks, with
// 8-byte accesses of 16-bit x (layer_bwd_vec) so that pass 3's G tile fits (64–116 bytes of
// spills at n = 4): 0.89 → 0.80 ms on the H200 at T = 16384, C = 4096. Elsewhere 0, no
// minimum, ptxas' own choice (PTX identical to no second bound): static H under the same cap
// measured 3% slower (its blocks wait on no Sinkhorn), and a minimum of 1 lets ptxas take 136
// registers at static n = 4 and 186 at n = 32, one block an SM (static fwd+bwd 1.31 → 1.61 ms).
// mhc_gen/gpu.py sizes the grid from it.
template <int NB, bool DYN>
MHC_CX int layer_bwd_blocks_per_sm() {
  return DYN && NB <= 4 ? 3 : 0;
}

// Elements a thread moves at once: at most 4 where the register cap applies (CUDA).
template <typename T, int NB, bool DYN>
MHC_CX int layer_bwd_vec() {
#if defined(MHC_CUDA)
  return layer_bwd_blocks_per_sm<NB, DYN>() > 1 && vec_width<T, NB>() > 4 ? 4 : vec_width<T, NB>();
#else
  return vec_width<T, NB>();
#endif
}

#if defined(MHC_CUDA)
#define MHC_LAYER_BWD_BOUNDS \
  __launch_bounds__(kThreads, layer_bwd_blocks_per_sm<n_bound<N>(), DYN>())
#else  // HIP's second bound counts warps an execution unit, not blocks
#define MHC_LAYER_BWD_BOUNDS __launch_bounds__(kThreads)
#endif

template <typename T, int N, int HIDDEN, int TM, bool DYN, int VEC>
__global__ void MHC_LAYER_BWD_BOUNDS layer_bwd_kernel(Args a) {
  constexpr int NB = n_bound<N>();
  constexpr bool kSmallN = NB * NB <= 64;  // ∂H_pre, ∂H_res accumulated in pass 3
  constexpr int SLOTS = DYN ? TM : 1;
  constexpr int K2 = NB + 1;        // pass 2 sums: ∂H_post, Σ g·u
  constexpr int K3 = NB + NB * NB;  // pass 3 sums (small n): ∂H_pre, ∂H_res
  constexpr int K = kSmallN && K3 > K2 ? K3 : K2;
  __shared__ Shared<NB, TM, SLOTS> s;
  __shared__ float partial[kWarps][K];  // viewed as [kWarps][K2], [kWarps][K3], [kWarps][NB]
  __shared__ float token_scale[2];      // s, then s³·mean(g·u)
  extern __shared__ float4 dynamic_smem[];
  const int n = N ? N : a.n;
  const int64_t C = HIDDEN ? HIDDEN : a.hidden;
  const int64_t cpad = (C + 3) / 4 * 4;
  float* su = reinterpret_cast<float*>(dynamic_smem);
  float* sg = su + cpad;
  float* sdw = sg + cpad;
  const int warp = threadIdx.x / kWarp;
  const int64_t token_elems = int64_t(n) * C;
  const int64_t c0 = int64_t(threadIdx.x) * VEC, cstep = int64_t(kThreads) * VEC;
  const T* x = a.in<T>(kX);
  const T* grad = a.in<T>(kGradOut);
  const float* w = a.in<float>(kNormWeight);
  T* dx = a.out<T>(kGradX);

  for (int64_t c = c0; c < C; c += cstep)
#pragma unroll
    for (int v = 0; v < VEC; ++v) sdw[c + v] = 0.0f;
  if constexpr (!DYN) {
    if (warp == 0) coefficients<NB, TM, SLOTS>(a, n, 0, nullptr, 1.0f, s);
  }

  const int64_t groups = (a.tokens + TM - 1) / TM;
  for (int64_t grp = blockIdx.x; grp < groups; grp += gridDim.x) {
    const int64_t t0 = grp * TM;
    const int nt = a.tokens - t0 < TM ? int(a.tokens - t0) : TM;
    if constexpr (DYN) {
      __syncthreads();             // the previous group's H is no longer read
      if (a.in<float>(kHResIn)) {  // from one coefficients launch on the saved z and r
        load_token_coefficients<NB, TM, SLOTS>(a, n, t0, nt, 0, s);
      } else {  // from the saved z and r, a warp a token, the block waiting
        const int m = num_logits(n);
        for (int idx = threadIdx.x; idx < nt * m; idx += kThreads)
          s.z[idx / m][idx % m] = a.in<float>(kZIn)[t0 * m + idx];
        for (int t = threadIdx.x; t < nt; t += kThreads) s.r[t] = a.in<float>(kRIn)[t0 + t];
        __syncthreads();
        for (int t = warp; t < nt; t += kWarps)
          coefficients<NB, TM, SLOTS>(a, n, t, s.z[t], s.r[t], s);
      }
    }
    __syncthreads();

    for (int t = 0; t < nt; ++t) {
      const int hs = DYN ? t : 0;
      const int64_t tok = t0 + t;
      const T* xt = x + tok * token_elems;
      const T* gt = grad + tok * token_elems;

      // Pass 1: u = H_pre·x (as the forward forms it), Σu².
      float sq = 0.0f;
      for (int64_t c = c0; c < C; c += cstep) {
        float u[VEC];
        pre_mix<T, NB, VEC>(xt, C, n, s.h_pre[hs], c, u);
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          su[c + v] = u[v];
          sq += u[v] * u[v];
        }
      }
      {
        const float wsum = warp_sum(sq);
        if (threadIdx.x % kWarp == 0) partial[warp][0] = wsum;
        __syncthreads();
        if (threadIdx.x == 0)
          token_scale[0] = 1.0f / token_rms(sum_partials<K>(partial, 0), C, a.eps_rms);
        __syncthreads();
      }
      const float scale = token_scale[0];

      // Pass 2: y recomputed; ∂y, ∂H_post, g = ∂y·w, Σ g·u and ∂w.
      float acc2[K2];
#pragma unroll
      for (int k = 0; k < K2; ++k) acc2[k] = 0.0f;
      for (int64_t c = c0; c < C; c += cstep) {
        float uv[VEC], wv[VEC], dy[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) uv[v] = su[c + v];
        load_pack<float, VEC>(w + c, wv);
#pragma unroll
        for (int v = 0; v < VEC; ++v) dy[v] = 0.0f;
#pragma unroll
        for (int i = 0; i < NB; ++i)
          if (i < n) {
            float gv[VEC];
            load_pack<T, VEC>(gt + i * C + c, gv);
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
              dy[v] += s.h_post[hs][i] * gv[v];
              acc2[i] += gv[v] * (uv[v] * scale * wv[v]);  // G·y
            }
          }
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const float g = dy[v] * wv[v];
          sg[c + v] = g;
          acc2[NB] += g * uv[v];
          sdw[c + v] += dy[v] * uv[v] * scale;
        }
      }
      warp_partials<K2>(acc2, reinterpret_cast<float(*)[K2]>(&partial[0][0]));
      const float(*p2)[K2] = reinterpret_cast<const float(*)[K2]>(&partial[0][0]);
      for (int k = threadIdx.x; k < n; k += kThreads)
        a.out<float>(kGradHPost)[tok * n + k] = sum_partials<K2>(p2, k);
      if (threadIdx.x == 0)
        token_scale[1] = scale * scale * scale * sum_partials<K2>(p2, NB) / float(C);
      __syncthreads();
      const float k_u = token_scale[1];
      // ∂u = s·g − u·s³·mean(g·u) at channel c (pass 3 and, for large n, ∂H_pre's pass).
      auto grad_u = [&](int64_t c) { return scale * sg[c] - su[c] * k_u; };

      // Pass 3: ∂u; ∂x = H_resᵀ·G + H_preᵀ·∂u; for small n ∂H_pre = ∂u·xᵀ, ∂H_res = G·xᵀ
      // (for large n the stream loop is not unrolled, so they take passes of their own).
      float acc3[kSmallN ? K3 : 1];
#pragma unroll
      for (int k = 0; k < (kSmallN ? K3 : 1); ++k) acc3[k] = 0.0f;
      for (int64_t c = c0; c < C; c += cstep) {
        float gs[NB][VEC], du[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) du[v] = grad_u(c + v);
#pragma unroll
        for (int i = 0; i < NB; ++i)
          if (i < n) load_pack<T, VEC>(gt + i * C + c, gs[i]);
        constexpr int kColUnroll = NB <= 8 ? NB : 1;
#pragma unroll kColUnroll
        for (int j = 0; j < NB; ++j)
          if (j < n) {
            float xv[VEC], o[VEC];
            load_pack<T, VEC>(xt + j * C + c, xv);
#pragma unroll
            for (int v = 0; v < VEC; ++v) o[v] = 0.0f;
            if constexpr (kSmallN) {
#pragma unroll
              for (int v = 0; v < VEC; ++v) acc3[j] += du[v] * xv[v];
            }
#pragma unroll
            for (int i = 0; i < NB; ++i)
              if (i < n) {
#pragma unroll
                for (int v = 0; v < VEC; ++v) o[v] += s.h_res[hs][i][j] * gs[i][v];
                if constexpr (kSmallN) {
#pragma unroll
                  for (int v = 0; v < VEC; ++v) acc3[NB + i * NB + j] += gs[i][v] * xv[v];
                }
              }
#pragma unroll
            for (int v = 0; v < VEC; ++v) o[v] += s.h_pre[hs][j] * du[v];
            store_pack<T, VEC, wide_stores<NB>()>(dx + tok * token_elems + j * C + c, o);
          }
      }
      float* dh_pre = a.out<float>(kGradHPre) + tok * n;
      float* dh_res = a.out<float>(kGradHRes) + tok * n * n;
      if constexpr (kSmallN) {
        warp_partials<K3>(acc3, reinterpret_cast<float(*)[K3]>(&partial[0][0]));
        const float(*p3)[K3] = reinterpret_cast<const float(*)[K3]>(&partial[0][0]);
        for (int k = threadIdx.x; k < n; k += kThreads) dh_pre[k] = sum_partials<K3>(p3, k);
        for (int k = threadIdx.x; k < n * n; k += kThreads)
          dh_res[k] = sum_partials<K3>(p3, NB + (k / n) * NB + k % n);
      } else {
        // Large n: one row a pass over C keeps NB accumulators (as post's): rows i < n are
        // ∂H_res[i] = G[i]·xᵀ, row n is ∂H_pre = ∂u·xᵀ (∂u again from u and g).
        for (int i = 0; i <= n; ++i) {
          float row[NB];
#pragma unroll
          for (int j = 0; j < NB; ++j) row[j] = 0.0f;
          for (int64_t c = threadIdx.x; c < C; c += kThreads) {
            const float gi = i < n ? to_float(gt[i * C + c]) : grad_u(c);
#pragma unroll
            for (int j = 0; j < NB; ++j)
              if (j < n) row[j] += gi * to_float(xt[j * C + c]);
          }
          // partial's rows are K ≥ NB floats: viewed as [kWarps][NB] for this sum.
          block_sum_to<NB>(row, reinterpret_cast<float(*)[NB]>(&partial[0][0]),
                           i < n ? dh_res + i * n : dh_pre, n);
        }
      }
      __syncthreads();  // partial and token_scale are reused by the next token
    }
  }

  float* dw = a.out<float>(kGradNormWeight) + int64_t(blockIdx.x) * C;
  for (int64_t c = c0; c < C; c += cstep)
#pragma unroll
    for (int v = 0; v < VEC; ++v) dw[c + v] = sdw[c + v];
}

template <typename T, int N, int HIDDEN, int TM, BwdOp OP, bool DYN>
int launch_layer_backward(const Args& a) {
  if (a.n < 1 || a.n > kMaxN || (N && a.n != N)) return kBadN;
  if (HIDDEN && a.hidden != HIDDEN) return kBadHidden;
  if (a.tokens == 0 || a.hidden == 0) return kOk;
  const stream_t stream = static_cast<stream_t>(a.stream);
  if constexpr (DYN) {
    if (a.p[kLayerScale]) return launch_layer_two_pass<T, N, HIDDEN>(a, stream);
  }
  if (!a.p[kGradX] || !a.p[kGradHPre] || !a.p[kGradHPost] || !a.p[kGradHRes] ||
      !a.p[kGradNormWeight])
    return kMissingInput;
  if (DYN && a.p[kHResIn] && (!a.p[kHPreIn] || !a.p[kHPostIn]))
    return kMissingInput;  // a given H comes whole
  if (DYN && !a.p[kHResIn] && (!a.p[kZIn] || !a.p[kRIn])) return kMissingInput;
  constexpr int VEC = layer_bwd_vec<T, n_bound<N>(), DYN>();
  const int vb = VEC * int(sizeof(T));
  const bool vec_ok = a.hidden % VEC == 0 && aligned_to(a.p[kX], vb) &&
                      aligned_to(a.p[kGradOut], vb) && aligned_to(a.p[kGradX], vb) &&
                      aligned_to(a.p[kNormWeight], VEC * 4);
  const size_t smem = size_t(layer_bwd_smem_floats(a.hidden)) * sizeof(float);
  const unsigned blocks = unsigned(a.splits < 1 ? 1 : a.splits);
  auto kernel = vec_ok ? layer_bwd_kernel<T, N, HIDDEN, TM, DYN, VEC>
                       : layer_bwd_kernel<T, N, HIDDEN, TM, DYN, 1>;
  return launch_with_smem(kernel, dim3(blocks), smem, stream, a);
}

}  // namespace mhc
