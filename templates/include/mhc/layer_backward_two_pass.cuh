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
// The ∂x pass: a block takes 16 tokens at a time and sweeps their rows, 128 columns (16 a
// warp: two n8 tiles) a step, so that its DRAM accesses run along whole rows; ∂z's
// fragments and the tokens' scalars are loaded once a tile. (Blocks owning 128 or 256
// columns of every token, the rows cut in 256- or 512-byte pieces: 1.62 and 1.02 ms at
// T = 16384, C = 4096, n = 4 on the H200, against the sums pass's 0.26 for 2/3 the bytes.)
constexpr int kDxCols = 16;
constexpr int kDxStep = kWarps * kDxCols;  // c a block step
// Floats a staged tile row: the epilogue's 16-byte reads (lanes 0-7 on tokens 0-7) are
// free of bank conflicts, the fragments' 8-byte stores 2-way at most.
constexpr int kDxLd = kDxCols + 4;

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

// Dynamic shared memory: each warp's n tiles of 16 tokens × kDxCols of ∂z·φᵀ (fp32), its
// x and G of the same tokens and columns (16-bit T), then the block's ∂w row (C floats):
// 104 KB at n = 4, C = 4096 (2 blocks an SM up to C = 9632).
template <int NB>
MHC_CX int64_t layer_dx_tile_floats() {
  return int64_t(kWarps) * NB * kMmaTokens * kDxLd;
}
template <int NB>
MHC_CX int64_t layer_dx_stage_elems() {  // a warp's: x and G
  return 2 * int64_t(NB) * kMmaTokens * kDxCols;
}
template <int NB>
MHC_CX int64_t layer_dx_smem_bytes(int64_t C) {
  return layer_dx_tile_floats<NB>() * 4 + int64_t(kWarps) * layer_dx_stage_elems<NB>() * 2 + C * 4;
}

template <typename T, int N, int HIDDEN, bool PAIRS>
__global__ void __launch_bounds__(kThreads, 2) layer_bwd_dx_kernel(Args a) {
  constexpr int NB = two_pass_bound<N>();
  constexpr int TM = kMmaTokens;
  constexpr int KS = (num_logits(NB) + 15) / 16;  // k-steps of 16 logits
  constexpr int VEC = 16 / int(sizeof(T));
  static_assert(kDxCols / VEC * TM == kWarp, "the epilogue is one pass: a vector a lane");
  __shared__ LayerDxShared<NB> s;
  extern __shared__ float4 dx_smem[];
  const int n = N ? N : a.n;
  const int m = num_logits(n);
  const int64_t C = HIDDEN ? HIDDEN : a.hidden;
  const int64_t K = int64_t(n) * C;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int g = lane / 4, c2 = 2 * (lane % 4);  // the fragment's row and column pair
  float* smem = reinterpret_cast<float*>(dx_smem);
  float(*tile)[TM][kDxLd] = reinterpret_cast<float(*)[TM][kDxLd]>(smem) + warp * NB;
  T* stage =
      reinterpret_cast<T*>(smem + layer_dx_tile_floats<NB>()) + warp * layer_dx_stage_elems<NB>();
  float* sdw = smem + layer_dx_tile_floats<NB>() +
               int64_t(kWarps) * layer_dx_stage_elems<NB>() * int64_t(sizeof(T)) / 4;
  // The epilogue's token and VEC consecutive c of the warp's 16 (lanes 0-15 on tokens
  // 0-15). Its staged pieces: stage[x or G][stream][token][16 columns], the two 16-byte
  // halves of a row swapped on tokens 4-7 and 12-15 (lanes 0-7 then read banks apart).
  const int te = lane % TM, col = lane / TM * VEC;
  T* const staged = stage + te * kDxCols + (col ^ ((te >> 2 & 1) * VEC));
  const float* phi = a.in<float>(kPhi);
  const float* w = a.in<float>(kNormWeight);
  const float* scratch = a.in<float>(kScratch);
  const int64_t row_len = scratch_row(a, n);
  const T* x_all = a.in<T>(kX);
  const T* g_all = a.in<T>(kGradOut);
  const int64_t tiles = (a.tokens + TM - 1) / TM;
  const int64_t steps = (C + kDxStep - 1) / kDxStep;
  for (int64_t k = threadIdx.x; k < C; k += kThreads) sdw[k] = 0.0f;

  // x and G of a step are copied into shared memory (cp.async) as soon as the step before
  // has read its own: each lane copies the 16-byte pieces its epilogue reads, and only
  // those, so it waits on its own copies alone, and their DRAM latency passes under the
  // products (and, a tile's first, the scalars' loads) instead of stalling the epilogue.
  auto copy_step = [&](int64_t tl, int64_t step) {
    const int64_t tok = tl * TM + te, c = step * kDxStep + warp * kDxCols + col;
    if (tl < tiles && tok < a.tokens && c < C)
#pragma unroll
      for (int j = 0; j < NB; ++j)
        if (j < n) {
          async_copy16(staged + j * (TM * kDxCols), x_all + tok * K + j * C + c);
          async_copy16(staged + (NB + j) * (TM * kDxCols), g_all + tok * K + j * C + c);
        }
    async_commit();
  };
  copy_step(blockIdx.x, 0);

  for (int64_t tl = blockIdx.x; tl < tiles; tl += gridDim.x) {
    const int64_t t0 = tl * TM;
    const int nt = a.tokens - t0 < TM ? int(a.tokens - t0) : TM;
    __syncthreads();  // the previous tile's scalars are no longer read; sdw is zero
    for (int idx = threadIdx.x; idx < nt * m; idx += kThreads)
      s.dz[idx / m][idx % m] = a.in<float>(kGradZ)[t0 * m + idx];
    for (int idx = threadIdx.x; idx < nt * n; idx += kThreads) {
      s.h_pre[idx / n][idx % n] = a.in<float>(kHPreIn)[t0 * n + idx];
      s.h_post[idx / n][idx % n] = a.in<float>(kHPostIn)[t0 * n + idx];
    }
    for (int idx = threadIdx.x; idx < nt * n * n; idx += kThreads)
      s.h_res[idx / (n * n)][idx % (n * n)] = a.in<float>(kHResIn)[t0 * n * n + idx];
    for (int t = threadIdx.x; t < nt; t += kThreads) {
      s.scale[t][0] = a.in<float>(kLayerScale)[(t0 + t) * 2];
      s.scale[t][1] = a.in<float>(kLayerScale)[(t0 + t) * 2 + 1];
      s.scale[t][2] = scratch[(t0 + t) * row_len + n];
    }
    __syncthreads();

    // A: ∂z of the 16 tokens (rows past nt and logits past m are zero), split once a tile.
    uint32_t a_hi[KS][4], a_lo[KS][4];
#pragma unroll
    for (int st = 0; st < KS; ++st) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int row = g + (r & 1) * 8, cl = 16 * st + c2 + (r >> 1) * 8;
        const bool live = row < nt;
        split_pair(live && cl < m ? s.dz[row][cl] : 0.0f,
                   live && cl + 1 < m ? s.dz[row][cl + 1] : 0.0f, a_hi[st][r], a_lo[st][r]);
      }
    }
    const T* x = x_all + t0 * K;
    T* dx = a.out<T>(kGradX) + t0 * K;
    const float sc = s.scale[te][0], k_u = s.scale[te][1], dr = s.scale[te][2];

#pragma unroll 1
    for (int64_t step = 0; step < steps; ++step) {
      const int64_t c_lo = step * kDxStep + warp * kDxCols, c = c_lo + col;
      const bool row_live = te < nt && c < C;  // C is a multiple of VEC
      // ∂z·φᵀ of every stream into the warp's tiles, a stream at a time (unrolled over
      // streams, the φ loads of all of them are issued together: registers).
#pragma unroll 1
      for (int j = 0; j < n; ++j) {
        const int64_t kb = int64_t(j) * C + c_lo;
#pragma unroll
        for (int nb = 0; nb < kDxCols / 8; ++nb) {
          const bool live = c_lo + nb * 8 + g < C;
          float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
          dz_phi_n8<KS, PAIRS>(phi + (live ? kb + nb * 8 + g : int64_t(0)) * m, m, live, c2, a_hi,
                               a_lo, d);
          *reinterpret_cast<float2*>(&tile[j][g][nb * 8 + c2]) = make_float2(d[0], d[1]);
          *reinterpret_cast<float2*>(&tile[j][g + 8][nb * 8 + c2]) = make_float2(d[2], d[3]);
        }
      }
      sync_warp();

      // Epilogue: VEC consecutive c of one token a lane.
      float dw[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) dw[v] = 0.0f;
      async_wait<0>();  // this lane's copies of the step
      if (row_live) {
        const int t = te;
        float wv[VEC];
#pragma unroll
        for (int v = 0; v < VEC; v += 4)
          load_pack<float, 4>(w + c + v, *reinterpret_cast<float(*)[4]>(wv + v));
        Pack<T, VEC> xp[NB], gp[NB];
#pragma unroll
        for (int j = 0; j < NB; ++j)
          if (j < n) {
            xp[j] = *reinterpret_cast<const Pack<T, VEC>*>(staged + j * (TM * kDxCols));
            gp[j] = *reinterpret_cast<const Pack<T, VEC>*>(staged + (NB + j) * (TM * kDxCols));
          }
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
          dw[v] = dy * u * sc;
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
      // ∂w: the tile's 16 tokens summed in a fixed order, into the block's row (its
      // columns are this lane's alone in the block).
#pragma unroll
      for (int v = 0; v < VEC; ++v)
#pragma unroll
        for (int o = 1; o < TM; o *= 2) dw[v] += shfl_xor(dw[v], o);
      if (te == 0 && c < C)
#pragma unroll
        for (int v = 0; v < VEC; ++v) sdw[c + v] += dw[v];
      sync_warp();  // the tiles are rewritten by the next step
      // This lane's stores above used what it read from its staged pieces: they are free.
      if (step + 1 < steps)
        copy_step(tl, step + 1);
      else
        copy_step(tl + gridDim.x, 0);
    }
  }
  async_wait<0>();  // no copy outlives the kernel
  __syncthreads();
  float* row = a.out<float>(kGradNormWeight) + int64_t(blockIdx.x) * C;
  for (int64_t k = threadIdx.x; k < C; k += kThreads) row[k] = sdw[k];
}
#endif  // MHC_CUDA

// The two-pass kernels of launch_layer_backward: the sums (kLayerScale out, no ∂x), or
// the ∂x pass (kGradZ in: pre's token kernel ran between them). Null where the variant
// cannot run them (the caller, mhc_gen/gpu.py, checks first: a status, not a fallback).
template <typename T, int N, int HIDDEN>
int launch_layer_two_pass(const Args& a, stream_t stream) {
  if constexpr (N > kTwoPassMaxN || sizeof(T) != 2) {
    return kBadN;
  } else {
    if (a.n > kTwoPassMaxN || a.hidden % (16 / int(sizeof(T))) != 0) return kBadN;
    if (!a.p[kHPreIn] || !a.p[kHPostIn] || !a.p[kHResIn] || !a.p[kLayerScale] || !a.p[kX] ||
        !a.p[kGradOut] || !a.p[kNormWeight])
      return kMissingInput;
    if (!aligned_to(a.p[kX], 16) || !aligned_to(a.p[kGradOut], 16) ||
        !aligned_to(a.p[kNormWeight], 16) || !aligned_to(a.p[kGradX], 16))
      return kMissingInput;
    if (!a.p[kGradZ]) {
      if (!a.p[kGradHPre] || !a.p[kGradHPost] || !a.p[kGradHRes]) return kMissingInput;
      const unsigned blocks = unsigned((a.tokens + kWarps - 1) / kWarps);
      layer_bwd_sums_kernel<T, N, HIDDEN, 16 / int(sizeof(T))><<<blocks, kThreads, 0, stream>>>(a);
      return int(last_error());
    }
#if defined(MHC_CUDA)
    if (!a.p[kGradX] || !a.p[kPhi] || !a.p[kScratch] || !a.p[kGradNormWeight]) return kMissingInput;
    const dim3 grid(unsigned(a.splits < 1 ? 1 : a.splits));
    const size_t smem = size_t(layer_dx_smem_bytes<two_pass_bound<N>()>(a.hidden));
    const bool pairs = num_logits(a.n) % 2 == 0 && aligned_to(a.p[kPhi], 8);
    if constexpr (N == 0) {
      return pairs
                 ? launch_with_smem(layer_bwd_dx_kernel<T, N, HIDDEN, true>, grid, smem, stream, a)
                 : launch_with_smem(layer_bwd_dx_kernel<T, N, HIDDEN, false>, grid, smem, stream,
                                    a);
    } else {
      constexpr bool kPairs = num_logits(N) % 2 == 0;
      if (pairs != kPairs) return kMissingInput;  // even m with φ misaligned: a view
      return launch_with_smem(layer_bwd_dx_kernel<T, N, HIDDEN, kPairs>, grid, smem, stream, a);
    }
#else
    return kMissingInput;  // the ∂x pass is tensor-core code: CUDA only
#endif
  }
}

}  // namespace mhc
