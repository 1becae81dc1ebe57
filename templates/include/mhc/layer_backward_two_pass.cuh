// The dynamic layer's backward in two passes over x and G = ∂x_next (CUDA, 16-bit x,
// n ≤ kTwoPassMaxN), in place of layer_bwd_kernel's three passes a token (barriers between
// them) and its ∂x_front, which pre's ∂x kernel read back (1 GB more at T = 16384, C = 4096,
// n = 4). Everything but ∂z·φᵀ is elementwise once a token's scalars are known:
//   sums  a warp a token, one read of x and G: u = H_pre·x, g = H_postᵀ·G and the
//         n² + 3n + 2 sums Σu², Σ(g·w)·u, G·(u·w), (g·w)·xᵀ, u·xᵀ, G·xᵀ give
//         s = 1/rms(u), k = s³·mean(g·w·u) (kLayerScale, for the ∂x pass) and
//         ∂H_post = s·G·(u·w), ∂H_pre = s·(g·w)·xᵀ − k·u·xᵀ (= ∂u·xᵀ), ∂H_res = G·xᵀ
//   (pre's token kernel then takes ∂H to ∂z and ∂r, the coefficients' backward)
//   dx    one read of x and G, one write of ∂x: ∂u = s·w·g − k·u, ∂x[j] = Σᵢ H_res[i][j]·G[i]
//         + H_pre[j]·∂u + (∂z·φᵀ)[j] + ∂r·x[j] with ∂z·φᵀ on tensor cores as in pre's ∂x
//         kernel, and ∂w = Σ_t s·g·u in each block's partial row (summed by the caller).
// Sums run in a fixed order (lanes, then shuffles; tokens in order): no atomics.
#pragma once

#include "token_backward.cuh"

namespace mhc {

// Streams the two-pass kernels serve: the sums' n² + 3n + 2 accumulators and the ∂x
// kernel's n staged tiles a warp stay in registers and shared memory up to here.
constexpr int kTwoPassMaxN = 4;

template <int N>
MHC_CX int two_pass_bound() {
  return N ? N : kTwoPassMaxN;
}

template <typename T, int N, int HIDDEN, int VEC>
__global__ void __launch_bounds__(kThreads) layer_bwd_sums_kernel(Args a) {
  constexpr int NB = two_pass_bound<N>();
  // acc: Σu², Σ(g·w)·u, then G·(u·w) [NB], (g·w)·xᵀ [NB], u·xᵀ [NB], G·xᵀ [NB][NB].
  constexpr int kPost = 2, kGw = kPost + NB, kU = kGw + NB, kRes = kU + NB;
  constexpr int KA = kRes + NB * NB;
  const int n = N ? N : a.n;
  const int64_t C = HIDDEN ? HIDDEN : a.hidden;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t tok = int64_t(blockIdx.x) * kWarps + warp;
  if (tok >= a.tokens) return;  // the whole warp: nothing below waits on other warps
  // Streams past n are zeros (H and data): they add nothing, and loops stay unrolled.
  float hp[NB], hq[NB];
#pragma unroll
  for (int j = 0; j < NB; ++j) {
    hp[j] = j < n ? a.in<float>(kHPreIn)[tok * n + j] : 0.0f;
    hq[j] = j < n ? a.in<float>(kHPostIn)[tok * n + j] : 0.0f;
  }
  const T* xt = a.in<T>(kX) + tok * n * C;
  const T* gt = a.in<T>(kGradOut) + tok * n * C;
  const float* w = a.in<float>(kNormWeight);
  float acc[KA];
#pragma unroll
  for (int k = 0; k < KA; ++k) acc[k] = 0.0f;
  for (int64_t c = int64_t(lane) * VEC; c < C; c += int64_t(kWarp) * VEC) {
    float xv[NB][VEC], gv[NB][VEC], wv[VEC];
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      if (j < n) {
        load_pack_ro<T, VEC>(xt + j * C + c, xv[j]);
        load_pack_ro<T, VEC>(gt + j * C + c, gv[j]);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) xv[j][v] = gv[j][v] = 0.0f;
      }
    }
#pragma unroll
    for (int v = 0; v < VEC; v += 4)
      load_pack<float, 4>(w + c + v, *reinterpret_cast<float(*)[4]>(wv + v));
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      float u = 0.0f, g = 0.0f;  // as the forward and layer_bwd_kernel form them
#pragma unroll
      for (int j = 0; j < NB; ++j) u += hp[j] * xv[j][v];
#pragma unroll
      for (int i = 0; i < NB; ++i) g += hq[i] * gv[i][v];
      const float uw = u * wv[v], gw = g * wv[v];
      acc[0] += u * u;
      acc[1] += gw * u;
#pragma unroll
      for (int i = 0; i < NB; ++i) acc[kPost + i] += gv[i][v] * uw;
#pragma unroll
      for (int j = 0; j < NB; ++j) {
        acc[kGw + j] += gw * xv[j][v];
        acc[kU + j] += u * xv[j][v];
      }
#pragma unroll
      for (int i = 0; i < NB; ++i)
#pragma unroll
        for (int j = 0; j < NB; ++j) acc[kRes + i * NB + j] += gv[i][v] * xv[j][v];
    }
  }
#pragma unroll
  for (int k = 0; k < KA; ++k) acc[k] = warp_sum(acc[k]);
  if (lane != 0) return;
  const float s = 1.0f / token_rms(acc[0], C, a.eps_rms);
  const float k = s * s * s * acc[1] / float(C);
  float* scale = a.out<float>(kLayerScale) + tok * 2;
  scale[0] = s;
  scale[1] = k;
  float* dh_pre = a.out<float>(kGradHPre) + tok * n;
  float* dh_post = a.out<float>(kGradHPost) + tok * n;
  float* dh_res = a.out<float>(kGradHRes) + tok * n * n;
#pragma unroll
  for (int i = 0; i < NB; ++i) {
    if (i < n) {
      dh_post[i] = s * acc[kPost + i];
      dh_pre[i] = s * acc[kGw + i] - k * acc[kU + i];
#pragma unroll
      for (int j = 0; j < NB; ++j)
        if (j < n) dh_res[i * n + j] = acc[kRes + i * NB + j];
    }
  }
}

#if defined(MHC_CUDA)
// The ∂x pass: a block owns 16 tokens at a time and 256 columns of each of their streams
// (32 a warp: four n8 tiles of ∂z·φᵀ a stream, staged whole for the epilogue), walking
// token tiles, each tile's scalars copied into shared memory under the tile before (cp.async,
// two buffers): 0.71 ms at T = 16384, C = 4096, n = 4 on the H100 (0.89 with them loaded
// between two barriers at each tile's start; session 31; the sums pass: 0.35 for 2/3 of the
// bytes). Measured slower: x and G copied ahead too (1.01 ms, session 31; notes/patches/
// dx_prefetch_xg.patch), and (session 15) 16 columns a warp with x and G
// copied a tile ahead by cp.async, 1.62 ms; blocks sweeping whole rows of their tiles, 128 columns
// a step, 1.24. Both halve the columns a stream's φ loads serve, and those loads wait on
// L2 once a stream (the stream loop is not unrolled: registers).
constexpr int kDxCols = 32;                 // c a warp: four n8 tiles
constexpr int kDxChunk = kWarps * kDxCols;  // c a block (grid.y splits C)
constexpr int kDxLd = kDxCols + 4;          // floats a staged tile row: the epilogue's
                                            // 16-byte reads are free of bank conflicts

// A block's 16 tokens' scalars; rows padded to an odd stride where lanes of 8 tokens read
// one element each (bank-conflict free).
template <int NB>
struct LayerDxShared {
  float h_pre[kMmaTokens][NB + 1];
  float h_post[kMmaTokens][NB + 1];
  float h_res[kMmaTokens][NB * NB + 1];
  float scale[kMmaTokens][3];  // s, k, ∂r/(n·C·r)
  alignas(16) float dz[kMmaTokens][padded_logits<NB>()];
};

// Dynamic shared memory: each warp's n tiles of 16 tokens × kDxCols of ∂z·φᵀ.
template <int NB>
MHC_CX int64_t layer_dx_smem_bytes() {
  return int64_t(kWarps) * NB * kMmaTokens * kDxLd * int64_t(sizeof(float));
}

// Two blocks an SM (128 registers, no spills; 74 KB of dynamic and 6.9 KB of static shared
// memory at n = 4): without the bound ptxas takes 167 registers, one block an SM.
template <typename T, int N, int HIDDEN>
__global__ void __launch_bounds__(kThreads, 2) layer_bwd_dx_kernel(Args a) {
  constexpr int NB = two_pass_bound<N>();
  constexpr int TM = kMmaTokens;
  constexpr int KS = (num_logits(NB) + 15) / 16;  // k-steps of 16 logits
  constexpr int VEC = 16 / int(sizeof(T));
  constexpr int kLanesPerRow = kDxCols / VEC;
  constexpr int kRowsPerPass = kWarp / kLanesPerRow;
  __shared__ LayerDxShared<NB> sbuf[2];  // this token tile's scalars and the next's
  extern __shared__ float4 dx_smem[];
  const int n = N ? N : a.n;
  const int m = num_logits(n);
  const int64_t C = HIDDEN ? HIDDEN : a.hidden;
  const int64_t K = int64_t(n) * C;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int g = lane / 4, c2 = 2 * (lane % 4);  // the fragment's row and column pair
  float(*tile)[TM][kDxLd] =
      reinterpret_cast<float(*)[TM][kDxLd]>(reinterpret_cast<float*>(dx_smem)) + warp * NB;
  const int64_t c_lo = int64_t(blockIdx.y) * kDxChunk + int64_t(warp) * kDxCols;
  const int col = (lane % kLanesPerRow) * VEC;  // the epilogue's VEC consecutive c
  const int64_t c = c_lo + col;
  const bool lane_live = c < C;  // C is a multiple of VEC: the whole vector is in range
  const uint4* frags = reinterpret_cast<const uint4*>(a.in<uint32_t>(kPhiFragments));
  const int steps = phi_fragment_steps(m);
  const float* w = a.in<float>(kNormWeight);
  const float* scratch = a.in<float>(kScratch);
  const int64_t row_len = scratch_row(a, n);
  float wv[VEC], dw[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) wv[v] = dw[v] = 0.0f;
  if (lane_live)
#pragma unroll
    for (int v = 0; v < VEC; v += 4)
      load_pack<float, 4>(w + c + v, *reinterpret_cast<float(*)[4]>(wv + v));

  const int64_t tiles = (a.tokens + TM - 1) / TM;
  // Token tile tl's scalars into buffer d, asynchronously: they land under the previous
  // tile's work instead of a DRAM round trip between two barriers at each tile's start.
  auto load_scalars = [&](int64_t tl, LayerDxShared<NB>& d) {
    if (tl < tiles) {
      const int64_t t0 = tl * TM;
      const int nt = a.tokens - t0 < TM ? int(a.tokens - t0) : TM;
      for (int idx = threadIdx.x; idx < nt * m; idx += kThreads)
        async_copy4(&d.dz[idx / m][idx % m], a.in<float>(kGradZ) + t0 * m + idx);
      for (int idx = threadIdx.x; idx < nt * n; idx += kThreads) {
        async_copy4(&d.h_pre[idx / n][idx % n], a.in<float>(kHPreIn) + t0 * n + idx);
        async_copy4(&d.h_post[idx / n][idx % n], a.in<float>(kHPostIn) + t0 * n + idx);
      }
      for (int idx = threadIdx.x; idx < nt * n * n; idx += kThreads)
        async_copy4(&d.h_res[idx / (n * n)][idx % (n * n)],
                    a.in<float>(kHResIn) + t0 * n * n + idx);
      for (int t = threadIdx.x; t < nt; t += kThreads) {
        async_copy4(&d.scale[t][0], a.in<float>(kLayerScale) + (t0 + t) * 2);
        async_copy4(&d.scale[t][1], a.in<float>(kLayerScale) + (t0 + t) * 2 + 1);
        async_copy4(&d.scale[t][2], scratch + (t0 + t) * row_len + n);
      }
    }
    async_commit();
  };
  load_scalars(blockIdx.x, sbuf[0]);
  int buf = 0;
  for (int64_t tl = blockIdx.x; tl < tiles; tl += gridDim.x, buf ^= 1) {
    const int64_t t0 = tl * TM;
    const int nt = a.tokens - t0 < TM ? int(a.tokens - t0) : TM;
    async_wait<0>();
    // Every thread's copies of this tile's scalars have landed, and the other buffer's
    // last reads (the tile before) are done.
    __syncthreads();
    load_scalars(tl + gridDim.x, sbuf[buf ^ 1]);
    LayerDxShared<NB>& s = sbuf[buf];

    // A: ∂z of the 16 tokens, split once a tile.
    uint32_t a_hi[KS][4], a_lo[KS][4];
    dz_fragments<KS>(s.dz, nt, m, g, c2, a_hi, a_lo);
    // ∂z·φᵀ of every stream into the warp's tiles, a stream at a time (unrolled over
    // streams, the φ loads of all of them were issued together: 160 registers).
#pragma unroll 1
    for (int j = 0; j < n; ++j) {
      const int64_t kb = int64_t(j) * C + c_lo;
#pragma unroll
      for (int nb = 0; nb < kDxCols / 8; ++nb) {
        const bool live = c_lo + nb * 8 + g < C;
        float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        const int64_t k = live ? kb + nb * 8 + g : int64_t(0);
        dz_phi_fragments_n8<KS>(frags + k * (steps * 4) + c2 / 2, steps, live, a_hi, a_lo, d);
        *reinterpret_cast<float2*>(&tile[j][g][nb * 8 + c2]) = make_float2(d[0], d[1]);
        *reinterpret_cast<float2*>(&tile[j][g + 8][nb * 8 + c2]) = make_float2(d[2], d[3]);
      }
    }
    sync_warp();

    // Epilogue: VEC consecutive c of one token a lane.
    const T* x = a.in<T>(kX) + t0 * K;
    const T* gr = a.in<T>(kGradOut) + t0 * K;
    T* dx = a.out<T>(kGradX) + t0 * K;
#pragma unroll 1
    for (int i = 0; i < TM / kRowsPerPass; ++i) {
      const int t = lane / kLanesPerRow + i * kRowsPerPass;
      if (t >= nt || !lane_live) break;
      // x and G stay packed (16-bit) until used: 4n registers, not 8n floats.
      Pack<T, VEC> xp[NB], gp[NB];
#pragma unroll
      for (int j = 0; j < NB; ++j) {
        if (j < n) {
          xp[j] = load_raw_ro<T, VEC>(x + t * K + j * C + c);
          gp[j] = load_raw_ro<T, VEC>(gr + t * K + j * C + c);
        }
      }
      const float sc = s.scale[t][0], k_u = s.scale[t][1], dr = s.scale[t][2];
      float du[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        float u = 0.0f, dy = 0.0f;  // as the forward and layer_bwd_kernel form them
#pragma unroll
        for (int j = 0; j < NB; ++j)
          if (j < n) u += s.h_pre[t][j] * to_float(xp[j].v[v]);
#pragma unroll
        for (int q = 0; q < NB; ++q)
          if (q < n) dy += s.h_post[t][q] * to_float(gp[q].v[v]);
        du[v] = sc * (dy * wv[v]) - u * k_u;
        dw[v] += dy * u * sc;
      }
#pragma unroll
      for (int j = 0; j < NB; ++j) {
        if (j >= n) continue;
        float o[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) o[v] = 0.0f;
#pragma unroll
        for (int q = 0; q < NB; ++q) {
          if (q >= n) continue;
          const float h = s.h_res[t][q * n + j];
#pragma unroll
          for (int v = 0; v < VEC; ++v) o[v] += h * to_float(gp[q].v[v]);
        }
        const float hj = s.h_pre[t][j];
#pragma unroll
        for (int v = 0; v < VEC; ++v)
          o[v] = o[v] + hj * du[v] + tile[j][t][col + v] + dr * to_float(xp[j].v[v]);
        store_pack<T, VEC>(dx + t * K + j * C + c, o);
      }
    }
    sync_warp();  // the tiles are rewritten by the next token tile
  }
  // ∂w: the lanes of one column sum their rows in a fixed order, one row a block.
#pragma unroll
  for (int v = 0; v < VEC; ++v)
#pragma unroll
    for (int o = kLanesPerRow; o < kWarp; o *= 2) dw[v] += shfl_xor(dw[v], o);
  if (lane < kLanesPerRow && lane_live) {
    float* row = a.out<float>(kGradNormWeight) + int64_t(blockIdx.x) * C + c;
#pragma unroll
    for (int v = 0; v < VEC; v += 4)
      store_pack<float, 4>(row + v, *reinterpret_cast<float(*)[4]>(dw + v));
  }
}
#endif  // MHC_CUDA

// The two-pass kernels of launch_layer_backward: the sums (kLayerScale out, no ∂x), or
// the ∂x pass (kGradZ in: pre's token kernel ran between them). kUnsupported where the
// variant cannot run them (the caller, mhc_gen/gpu.py, checks first: a status, not a
// fallback).
template <typename T, int N, int HIDDEN>
int launch_layer_two_pass(const Args& a, stream_t stream) {
  if constexpr (N > kTwoPassMaxN || sizeof(T) != 2) {
    return kUnsupported;
  } else {
    if (a.n > kTwoPassMaxN || a.hidden % (16 / int(sizeof(T))) != 0) return kUnsupported;
    if (!a.p[kHPreIn] || !a.p[kHPostIn] || !a.p[kHResIn] || !a.p[kLayerScale] || !a.p[kX] ||
        !a.p[kGradOut] || !a.p[kNormWeight])
      return kMissingInput;
    if (!aligned_to(a.p[kX], 16) || !aligned_to(a.p[kGradOut], 16) ||
        !aligned_to(a.p[kNormWeight], 16) || !aligned_to(a.p[kGradX], 16))
      return kUnsupported;
    if (!a.p[kGradZ]) {
      if (!a.p[kGradHPre] || !a.p[kGradHPost] || !a.p[kGradHRes]) return kMissingInput;
      const unsigned blocks = unsigned((a.tokens + kWarps - 1) / kWarps);
      layer_bwd_sums_kernel<T, N, HIDDEN, 16 / int(sizeof(T))><<<blocks, kThreads, 0, stream>>>(a);
      return int(last_error());
    }
#if defined(MHC_CUDA)
    if (!a.p[kGradX] || !a.p[kScratch] || !a.p[kGradNormWeight]) return kMissingInput;
    if (const int status = launch_phi_fragments<two_pass_bound<N>()>(a, stream); status != kOk)
      return status;
    const dim3 grid(unsigned(a.splits < 1 ? 1 : a.splits),
                    unsigned((a.hidden + kDxChunk - 1) / kDxChunk));
    const size_t smem = size_t(layer_dx_smem_bytes<two_pass_bound<N>()>());
    return launch_with_smem(layer_bwd_dx_kernel<T, N, HIDDEN>, grid, smem, stream, a);
#else
    return kUnsupported;  // the ∂x pass is tensor-core code: CUDA only
#endif
  }
}

}  // namespace mhc
