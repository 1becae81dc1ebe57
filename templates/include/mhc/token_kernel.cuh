// The forward kernel family. One template serves every op and H mode:
//
//   phase 1  (dynamic coeffs/pre/layer)  z = x̄·φ and Σx̄² for TM tokens
//   phase 2  (all but dynamic post)      H_pre, H_post, H_res from the logits
//   phase 3  (pre, post, layer)          the per-element stream mixing
//
// A block owns TM consecutive tokens (they share the φ reads of phase 1) and,
// for ops without a reduction over C, one chunk of C (grid.y). Every reduction
// runs in a fixed order, so results are bitwise reproducible.
#pragma once

#include "args.h"
#include "layer_split.h"
#include "platform.h"
#include "token_math.h"

namespace mhc {

enum class Op { Coeffs, Pre, Post, Layer };

constexpr int kWarps = kThreads / kWarp;

// Compile-time bound on n: the variant's n, or kMaxN for the run-time-n variant.
template <int N>
MHC_CX int n_bound() {
  return N ? N : kMaxN;
}

// Elements per thread access in phase 3: 16 bytes, fewer where the n
// stream values of a vector would not fit in registers; a power of two, so
// that a vector is one aligned access.
template <typename T, int NB>
MHC_CX int vec_width() {
  const int bytes_vec = 16 / int(sizeof(T));
  const int reg_vec = NB <= 4 ? 8 : NB <= 16 ? 32 / NB : 2;
  const int want = bytes_vec < reg_vec ? bytes_vec : reg_vec;
  int v = 1;
  while (v * 2 <= want) v *= 2;
  return v;
}

// Projection columns accumulated per pass over x̄ (registers: TM × kGroup).
template <int NB>
MHC_CX int logit_group() {
  return num_logits(NB) < 24 ? num_logits(NB) : 24;
}

// Leading dimension of H_res in shared memory: +1 so that a lane per row (Sinkhorn) reads
// without bank conflicts; for n ≥ 16, a multiple of 4, so that phase 3 reads a row four
// entries (one 16-byte load) at a time: with one load per multiply-add, n² shared loads a
// column made post at n = 32 bound by shared-load issue, not by memory.
template <int NB>
MHC_CX int res_ld() {
  return NB >= 16 && NB % 4 == 0 ? NB + 4 : NB + 1;
}

template <int NB, int TM, int SLOTS>
struct Shared {
  float h_pre[SLOTS][NB];
  float h_post[SLOTS][NB];
  alignas(16) float h_res[SLOTS][NB][res_ld<NB>()];
  float z[TM][num_logits(NB)];
  float sum_sq[TM];
  float r[TM];
  float partial[kWarps][TM][logit_group<NB>()];
};

// Sums v[TM][G] over the whole block; thread 0..TM·G-1 gets entry (idx/G, idx%G).
template <int TM, int G, int NB, int SLOTS>
MHC_DEV void block_sum(float (&v)[TM][G], Shared<NB, TM, SLOTS>& s, float (*dst)[num_logits(NB)],
                       int col0, int cols) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
#pragma unroll
  for (int t = 0; t < TM; ++t)
#pragma unroll
    for (int q = 0; q < G; ++q) {
      const float w = warp_sum(v[t][q]);
      if (lane == 0) s.partial[warp][t][q] = w;
    }
  __syncthreads();
  for (int idx = threadIdx.x; idx < TM * G; idx += kThreads) {
    const int t = idx / G, q = idx % G;
    float acc = 0.0f;
    for (int w = 0; w < kWarps; ++w) acc += s.partial[w][t][q];
    if (q < cols) dst[t][col0 + q] = acc;
  }
  __syncthreads();
}

// Σ over the block of v[t] for each of the TM tokens, in a fixed order (warp sums, then
// the warps in index order): thread t < limit returns token t's sum, the others 0.
template <int NB, int TM, int SLOTS>
MHC_DEV float token_sums(const float (&v)[TM], Shared<NB, TM, SLOTS>& s, int limit) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
#pragma unroll
  for (int t = 0; t < TM; ++t) {
    const float w = warp_sum(v[t]);
    if (lane == 0) s.partial[warp][t][0] = w;
  }
  __syncthreads();
  float acc = 0.0f;
  if (threadIdx.x < limit)
    for (int w = 0; w < kWarps; ++w) acc += s.partial[w][threadIdx.x][0];
  return acc;
}

// token_sums for one value a thread: thread 0 gets the block's sum (the same order).
template <int NB, int TM, int SLOTS>
MHC_DEV float block_total(float v, Shared<NB, TM, SLOTS>& s) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const float w = warp_sum(v);
  if (lane == 0) s.partial[warp][0][0] = w;
  __syncthreads();
  float acc = 0.0f;
  if (threadIdx.x == 0)
    for (int i = 0; i < kWarps; ++i) acc += s.partial[i][0][0];
  return acc;
}

// 1 / rms(u) of one token from each thread's partial Σu², on every thread (two barriers).
template <int NB, int TM, int SLOTS>
MHC_DEV float block_inv_rms(float sq, int64_t C, float eps, Shared<NB, TM, SLOTS>& s) {
  const float sum_sq = block_total(sq, s);
  if (threadIdx.x == 0) s.sum_sq[0] = 1.0f / token_rms(sum_sq, C, eps);
  __syncthreads();
  return s.sum_sq[0];
}

// Phase 1: z[t] = x̄_t·φ and sum_sq[t] = Σ x̄_t² for the block's nt tokens.
template <typename T, int NB, int TM, int SLOTS>
MHC_DEV void project(const Args& a, int n, int64_t C, int64_t t0, int nt,
                     Shared<NB, TM, SLOTS>& s) {
  constexpr int G = logit_group<NB>();
  const int m = num_logits(n);
  const int64_t K = int64_t(n) * C;
  const T* x = a.in<T>(kX) + t0 * K;
  float sq[TM];
#pragma unroll
  for (int t = 0; t < TM; ++t) sq[t] = 0.0f;

  for (int col0 = 0; col0 < m; col0 += G) {
    float acc[TM][G];
#pragma unroll
    for (int t = 0; t < TM; ++t)
#pragma unroll
      for (int q = 0; q < G; ++q) acc[t][q] = 0.0f;
    const int cols = m - col0 < G ? m - col0 : G;
    for (int64_t k = threadIdx.x; k < K; k += kThreads) {
      float xv[TM];
#pragma unroll
      for (int t = 0; t < TM; ++t) xv[t] = t < nt ? to_float(x[t * K + k]) : 0.0f;
      if (col0 == 0) {
#pragma unroll
        for (int t = 0; t < TM; ++t) sq[t] += xv[t] * xv[t];
      }
      const float* phi_row = a.in<float>(kPhi) + k * m + col0;
#pragma unroll
      for (int q = 0; q < G; ++q) {
        if (q < cols) {
          const float p = phi_row[q];
#pragma unroll
          for (int t = 0; t < TM; ++t) acc[t][q] += xv[t] * p;
        }
      }
    }
    block_sum<TM, G>(acc, s, s.z, col0, cols);
  }
  const float sum_sq = token_sums(sq, s, TM);
  if (threadIdx.x < TM) s.sum_sq[threadIdx.x] = sum_sq;
  __syncthreads();
}

// z and r of token t from the projection kernel's per-split outputs (kZIn [S, T, m], kSqIn
// [S, T], S = Args::splits), summed in split order; else z from kZIn and r from kRIn.
MHC_DEV float projected_logit(const Args& a, int64_t t, int m, int k) {
  const float* z = a.in<float>(kZIn);
  float v = z[t * m + k];
  if (a.in<float>(kSqIn))
    for (int p = 1; p < a.splits; ++p) v += z[(p * a.tokens + t) * m + k];
  return v;
}
MHC_DEV float projected_rms(const Args& a, int64_t t, int64_t K) {
  const float* sq = a.in<float>(kSqIn);
  if (!sq) return a.in<float>(kRIn)[t];
  float v = sq[t];
  for (int p = 1; p < a.splits; ++p) v += sq[p * a.tokens + t];
  return token_rms(v, K, a.eps_rms);
}

// r of the block's nt tokens into s.r, from Σx̄² in a fixed order (phase 1 when z came
// from a GEMM that gave no r). 16-byte loads where n·C and x allow.
// With stash, the x it reads (16-byte path only) is also kept there, token t at t·K.
template <typename T, int NB, int TM, int SLOTS>
MHC_DEV void token_norms(const Args& a, int64_t K, int64_t t0, int nt, Shared<NB, TM, SLOTS>& s,
                         T* stash = nullptr) {
  constexpr int V = 16 / int(sizeof(T));
  const T* x = a.in<T>(kX) + t0 * K;
  const bool vec = K % V == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  float sq[TM];
#pragma unroll
  for (int t = 0; t < TM; ++t) {
    sq[t] = 0.0f;
    if (t >= nt) continue;
    if (vec) {
      for (int64_t k = int64_t(threadIdx.x) * V; k < K; k += int64_t(kThreads) * V) {
        float v[V];
        load_pack<T, V>(x + t * K + k, v);
        if (stash)  // the same 16 bytes again: the compiler reuses the load
          *reinterpret_cast<Pack<T, V>*>(stash + t * K + k) =
              *reinterpret_cast<const Pack<T, V>*>(x + t * K + k);
#pragma unroll
        for (int i = 0; i < V; ++i) sq[t] += v[i] * v[i];
      }
    } else {
      for (int64_t k = threadIdx.x; k < K; k += kThreads) {
        const float v = to_float(x[t * K + k]);
        sq[t] += v * v;
      }
    }
  }
  const float sum_sq = token_sums(sq, s, nt);
  if (threadIdx.x < nt) s.r[threadIdx.x] = token_rms(sum_sq, K, a.eps_rms);
}

// Phase 2, run by one warp: H_pre, H_post and H_res of one slot from the
// logits z (null for static H, where the logits are the bias alone).
template <int NB, int TM, int SLOTS>
MHC_DEV void coefficients(const Args& a, int n, int slot, const float* z, float r,
                          Shared<NB, TM, SLOTS>& s) {
  const int lane = threadIdx.x % kWarp;
  constexpr int ld = res_ld<NB>();
  float* M = &s.h_res[slot][0][0];
  float row_max = -__builtin_inff();
  if (lane < n)
    row_max = coefficient_row(lane, n, z, r, a.in<float>(kAlpha), a.in<float>(kBias), a.post_mult,
                              s.h_pre[slot], s.h_post[slot], M, ld);
  const float max_logit = warp_max(row_max);
  if (lane < n) sinkhorn_exp_row(M, ld, n, lane, max_logit);
  sync_warp();
  for (int it = 0; it < a.sinkhorn_iters; ++it) {
    if (lane < n) sinkhorn_col_step(M, ld, n, lane, a.eps_sk);
    sync_warp();
    if (lane < n) sinkhorn_row_step(M, ld, n, lane, a.eps_sk);
    sync_warp();
  }
}

// The coefficients from given z and r (or the projection's partials), a token a thread
// (compile-time n ≤ 8, so that M stays in registers): coefficients()'s operations in its order (a
// column or row step touches its own column or row, so the steps one after another are the warp's
// steps side by side; the max is exact in any order), so bitwise its H. In a block that also mixes,
// a token's Sinkhorn (one warp) holds up the other warps: ≈ 6 µs a token at n = 4
// (notes/PERF.md, session 13). Blocks of one warp: 16,384 tokens are 512 blocks, over every
// SM, yet only ≈ 4 warps an SM, so each thread's chain sets the time (7.6 µs for 16,384
// tokens at n = 4 on an H200, session 23; 24 µs before its loads, rows and reciprocals).
constexpr int kThreadCoeffsMaxN = 8;
constexpr int kThreadCoeffsBlock = 32;

// A block's tokens' rows of W floats (token t's at t·W in global memory) pass through shared
// memory, so that each load or store instruction covers consecutive addresses: a thread
// reading its own token's row touched 24 cache lines an instruction at n = 4. The +1 puts
// a thread's row in distinct banks.
template <int W>
using BlockRows = float[kThreadCoeffsBlock][W + 1];

// rows[t][:] = Σ_p src[p·stride + (t0 + t)·W + :] for the block's nt tokens, p in split order
// (projected_logit's sums, so the same bits); each thread's share of every split is loaded
// together. Returns, in v, this thread's share (element threadIdx.x + kThreadCoeffsBlock·q).
template <int W>
MHC_DEV void rows_from(const float* src, int64_t t0, int nt, int parts, int64_t stride,
                       BlockRows<W>& rows, float (&v)[W]) {
  const float* base = src + t0 * W;
#pragma unroll
  for (int q = 0; q < W; ++q) {
    const int e = threadIdx.x + kThreadCoeffsBlock * q;
    v[q] = e < nt * W ? base[e] : 0.0f;
  }
  for (int p = 1; p < parts; ++p)
#pragma unroll
    for (int q = 0; q < W; ++q) {
      const int e = threadIdx.x + kThreadCoeffsBlock * q;
      if (e < nt * W) v[q] += base[p * stride + e];
    }
#pragma unroll
  for (int q = 0; q < W; ++q) {
    const int e = threadIdx.x + kThreadCoeffsBlock * q;
    rows[e / W][e % W] = v[q];
  }
  __syncthreads();
}

// dst[(t0 + t)·W + :] = rows[t][:] for the block's nt tokens (rows written by their threads).
template <int W>
MHC_DEV void rows_to(float* dst, int64_t t0, int nt, const BlockRows<W>& rows) {
  __syncthreads();
#pragma unroll
  for (int q = 0; q < W; ++q) {
    const int e = threadIdx.x + kThreadCoeffsBlock * q;
    if (e < nt * W) dst[t0 * W + e] = rows[e / W][e % W];
  }
  __syncthreads();
}

// rows_to from each thread's row v, through shared rows of RP − 1 ≥ W floats (a wider
// buffer viewed as W wide; the barrier first: every thread is past its reads of them).
template <int W, int RP>
MHC_DEV void put_rows(float* dst, int64_t t0, int nt, float (&rows)[kThreadCoeffsBlock][RP],
                      const float (&v)[W]) {
  static_assert(W < RP, "the shared rows hold the widest");
  auto& view = reinterpret_cast<BlockRows<W>&>(rows);
  __syncthreads();
#pragma unroll
  for (int k = 0; k < W; ++k) view[threadIdx.x][k] = v[k];
  rows_to<W>(dst, t0, nt, view);
}

// One token's H by one thread from its logits z and r, M (H_res, n × n) in registers.
template <int N>
MHC_DEV void thread_coefficients(const Args& a, const float (&z)[num_logits(N)], float r,
                                 const float (&alpha)[3], const float (&bias)[num_logits(N)],
                                 float (&h_pre)[N], float (&h_post)[N], float (&M)[N * N]) {
  float max_logit = -__builtin_inff();
#pragma unroll
  for (int i = 0; i < N; ++i)
    max_logit = fmaxf(max_logit,
                      coefficient_row(i, N, z, r, alpha, bias, a.post_mult, h_pre, h_post, M, N));
#pragma unroll
  for (int i = 0; i < N; ++i) sinkhorn_exp_row(M, N, N, i, max_logit);
  for (int it = 0; it < a.sinkhorn_iters; ++it) {
#pragma unroll
    for (int j = 0; j < N; ++j) sinkhorn_col_step(M, N, N, j, a.eps_sk);
#pragma unroll
    for (int i = 0; i < N; ++i) sinkhorn_row_step(M, N, N, i, a.eps_sk);
  }
}

template <int N>
__global__ void __launch_bounds__(kThreadCoeffsBlock) coeffs_thread_kernel(Args a) {
  constexpr int m = num_logits(N);
  __shared__ BlockRows<m> rows;
  const int64_t t0 = int64_t(blockIdx.x) * kThreadCoeffsBlock;
  const int nt = int(a.tokens - t0 < kThreadCoeffsBlock ? a.tokens - t0 : kThreadCoeffsBlock);
  const int lane = threadIdx.x;
  const int64_t t = t0 + lane;
  const float* sq = a.in<float>(kSqIn);
  float share[m];
  rows_from<m>(a.in<float>(kZIn), t0, nt, sq ? a.splits : 1, a.tokens * m, rows, share);
  if (float* zo = a.out<float>(kZOut))
#pragma unroll
    for (int q = 0; q < m; ++q) {
      const int e = lane + kThreadCoeffsBlock * q;
      if (e < nt * m) zo[t0 * m + e] = share[q];
    }
  float z[m], bias[m], alpha[3], h_pre[N], h_post[N], M[N * N];
#pragma unroll
  for (int k = 0; k < m; ++k) z[k] = rows[lane][k];
#pragma unroll
  for (int k = 0; k < m; ++k) bias[k] = a.in<float>(kBias)[k];
#pragma unroll
  for (int g = 0; g < 3; ++g) alpha[g] = a.in<float>(kAlpha)[g];
  float r = 0.0f;
  if (lane < nt) {
    if (sq) {
      float v = sq[t];
      for (int p = 1; p < a.splits; ++p) v += sq[p * a.tokens + t];
      r = token_rms(v, int64_t(N) * a.hidden, a.eps_rms);
    } else {
      r = a.in<float>(kRIn)[t];
    }
    if (float* ro = a.out<float>(kROut)) ro[t] = r;
  } else {
    r = 1.0f;  // a row past T: computed on zeros, never stored
  }
  thread_coefficients<N>(a, z, r, alpha, bias, h_pre, h_post, M);
  // The outputs through the same shared rows.
  if (float* h = a.out<float>(kHRes)) put_rows<N * N>(h, t0, nt, rows, M);
  if (float* h = a.out<float>(kHPre)) put_rows<N>(h, t0, nt, rows, h_pre);
  if (float* h = a.out<float>(kHPost)) put_rows<N>(h, t0, nt, rows, h_post);
}

// Writes slot's H (and, for the backward, z and r) to global memory at token t.
template <int NB, int TM, int SLOTS>
MHC_DEV void store_coefficients(const Args& a, int n, int slot, int64_t t,
                                const Shared<NB, TM, SLOTS>& s) {
  const int lane = threadIdx.x % kWarp;
  const int m = num_logits(n);
  if (float* z = a.out<float>(kZOut))
    for (int k = lane; k < m; k += kWarp) z[t * m + k] = s.z[slot][k];
  if (lane == 0 && a.out<float>(kROut)) a.out<float>(kROut)[t] = s.r[slot];
  if (lane >= n) return;
  if (float* h = a.out<float>(kHPre)) h[t * n + lane] = s.h_pre[slot][lane];
  if (float* h = a.out<float>(kHPost)) h[t * n + lane] = s.h_post[slot][lane];
  if (float* h = a.out<float>(kHRes))
    for (int j = 0; j < n; ++j) h[(t * n + lane) * n + j] = s.h_res[slot][lane][j];
}

// Slot 0's static H from the caller (kHPreIn, kHPostIn, kHResIn: one single-block launch
// of the static coefficients computed them with coefficients(), so every result is bitwise
// the same), instead of each block's first warp running the Sinkhorn while the others wait.
template <int NB, int TM, int SLOTS>
MHC_DEV void load_static_coefficients(const Args& a, int n, Shared<NB, TM, SLOTS>& s) {
  for (int idx = threadIdx.x; idx < n * n; idx += kThreads)
    s.h_res[0][idx / n][idx % n] = a.in<float>(kHResIn)[idx];
  for (int i = threadIdx.x; i < n; i += kThreads) {
    s.h_pre[0][i] = a.in<float>(kHPreIn)[i];
    s.h_post[0][i] = a.in<float>(kHPostIn)[i];
  }
}

// Per-token H of tokens [t0, t0 + nt) from the caller into slots slot0, ...: H_post and
// H_res for post; H_pre too for the dynamic layer (kHPreIn non-null), whose H then comes
// from one coefficients launch on the projection's z and r.
template <int NB, int TM, int SLOTS>
MHC_DEV void load_token_coefficients(const Args& a, int n, int64_t t0, int nt, int slot0,
                                     Shared<NB, TM, SLOTS>& s) {
  const float* h_pre = a.in<float>(kHPreIn);
  for (int idx = threadIdx.x; idx < nt * n; idx += kThreads) {
    const int t = idx / n, i = idx % n;
    const int64_t row = (t0 + t) * n + i;
    if (h_pre) s.h_pre[slot0 + t][i] = h_pre[row];
    s.h_post[slot0 + t][i] = a.in<float>(kHPostIn)[row];
    for (int j = 0; j < n; ++j) s.h_res[slot0 + t][i][j] = a.in<float>(kHResIn)[row * n + j];
  }
}

// u = Σ_j H_pre[j]·x[j] for one token and VEC columns at c, streams in ascending order: the
// one order every kernel uses, so that the layer's backward recomputes the forward's u bitwise.
template <typename T, int NB, int VEC>
MHC_DEV void pre_mix(const T* xt, int64_t C, int n, const float* h_pre, int64_t c,
                     float (&u)[VEC]) {
#pragma unroll
  for (int v = 0; v < VEC; ++v) u[v] = 0.0f;
#pragma unroll
  for (int j = 0; j < NB; ++j) {
    if (j < n) {
      float xv[VEC];
      load_pack<T, VEC>(xt + j * C + c, xv);
#pragma unroll
      for (int v = 0; v < VEC; ++v) u[v] += h_pre[j] * xv[v];
    }
  }
}

// pre_mix's u for x given as packs (the resident layer's registers), in the same order.
template <typename T, int NB, int VEC>
MHC_DEV void pre_mix_packs(const Pack<T, VEC> (&xp)[NB], int n, const float* h_pre,
                           float (&u)[VEC]) {
#pragma unroll
  for (int v = 0; v < VEC; ++v) u[v] = 0.0f;
#pragma unroll
  for (int j = 0; j < NB; ++j)
    if (j < n)
#pragma unroll
      for (int v = 0; v < VEC; ++v) u[v] += h_pre[j] * to_float(xp[j].v[v]);
}

// Phase 3 for one token and one vector of VEC columns starting at c.
template <typename T, int NB, int VEC, typename U>
MHC_DEV void pre_vector(const T* xt, U* ut, int64_t C, int n, const float* h_pre, int64_t c) {
  float acc[VEC];
  pre_mix<T, NB, VEC>(xt, C, n, h_pre, c, acc);
  store_pack<U, VEC>(ut + c, acc);
}

// Rows of H_res read as float4 for n ≥ 16. Not for n = 3, 7, 11, 15, whose padded rows are
// whole quads too: xs has no fourth stream for the last quad to read.
template <int NB>
MHC_CX bool quad_rows() {
  return NB % 4 == 0 && res_ld<NB>() % 4 == 0;
}

// x_next[i] = Σ_j H_res[i][j]·x[j] + H_post[i]·y for one vector of columns, x given (xs[j]
// zero for j ≥ n where quad_rows: a quad may reach past n, and its x must add nothing).
// Rows [i_lo, i_hi) only: all of them, or a block's group of rows (layer_rows).
template <typename T, int NB, int VEC>
MHC_DEV void post_rows(const float (&xs)[NB][VEC], const float (&y)[VEC], T* ot, int64_t C, int n,
                       const float* h_post, const float (*h_res)[res_ld<NB>()], int64_t c,
                       int i_lo = 0, int i_hi = NB) {
  constexpr bool kQuads = quad_rows<NB>();
  // Rows are not unrolled past n = 8: the code would grow n²-fold.
  constexpr int kRowUnroll = NB <= 8 ? NB : 1;
  const int i_end = i_hi < n ? i_hi : n;
#pragma unroll kRowUnroll
  for (int i = 0; i < NB; ++i) {
    if (i >= i_lo && i < i_end) {
      float o[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) o[v] = h_post[i] * y[v];
      if constexpr (kQuads) {
        // The same order of additions as the scalar loop (j ascending).
#pragma unroll
        for (int j = 0; j < NB; j += 4)
          if (j < n) {
            const float4 h = *reinterpret_cast<const float4*>(&h_res[i][j]);
            const float hq[4] = {h.x, j + 1 < n ? h.y : 0.0f, j + 2 < n ? h.z : 0.0f,
                                 j + 3 < n ? h.w : 0.0f};
#pragma unroll
            for (int q = 0; q < 4; ++q)
#pragma unroll
              for (int v = 0; v < VEC; ++v) o[v] += hq[q] * xs[j + q][v];
          }
      } else {
#pragma unroll
        for (int j = 0; j < NB; ++j)
          if (j < n) {
#pragma unroll
            for (int v = 0; v < VEC; ++v) o[v] += h_res[i][j] * xs[j][v];
          }
      }
      store_pack<T, VEC, wide_stores<NB>()>(ot + i * C + c, o);
    }
  }
}

// post_rows with x read from memory.
template <typename T, int NB, int VEC>
MHC_DEV void post_vector(const T* xt, const float (&y)[VEC], T* ot, int64_t C, int n,
                         const float* h_post, const float (*h_res)[res_ld<NB>()], int64_t c,
                         int i_lo = 0, int i_hi = NB) {
  float xs[NB][VEC];
#pragma unroll
  for (int j = 0; j < NB; ++j) {
    if (j < n)
      load_pack<T, VEC>(xt + j * C + c, xs[j]);
    else if (quad_rows<NB>())
#pragma unroll
      for (int v = 0; v < VEC; ++v) xs[j][v] = 0.0f;
  }
  post_rows<T, NB, VEC>(xs, y, ot, C, n, h_post, h_res, c, i_lo, i_hi);
}

// The fused layer's second pass for one vector of columns: y = u·inv_rms·w from u recomputed
// (cheaper than staging C floats), then x_next = H_res·x + H_postᵀ·y.
template <typename T, int NB, int VEC>
MHC_DEV void layer_vector(const T* xt, T* ot, int64_t C, int n, const float* h_pre,
                          const float* h_post, const float (*h_res)[res_ld<NB>()], float inv_rms,
                          const float* w, int64_t c, int i_lo = 0, int i_hi = NB) {
  float y[VEC];
  pre_mix<T, NB, VEC>(xt, C, n, h_pre, c, y);
#pragma unroll
  for (int v = 0; v < VEC; ++v) y[v] = y[v] * inv_rms * w[c + v];
  post_vector<T, NB, VEC>(xt, y, ot, C, n, h_post, h_res, c, i_lo, i_hi);
}

// PROJECT: phase 1 runs here (no z from a GEMM). A separate
// instantiation, as its TM × 24 accumulators would otherwise set the register count
// (and so the occupancy) of the kernels that are given z.
// STASH (dynamic layer given z, no r): the r pass keeps the block's TM tokens of x in dynamic
// shared memory and passes A and B read them there, so DRAM sees x once; the Sinkhorns of the
// TM tokens still run side by side on TM warps (staged_layer_kernel's one token at a time
// measured slower for dynamic H: notes/PERF.md, session 8). Bitwise the same results.
template <typename T, int N, int HIDDEN, int TM, Op OP, bool DYN, int VEC, bool PROJECT,
          bool STASH = false>
__global__ void __launch_bounds__(kThreads) token_kernel(Args a) {
  static_assert(!STASH || (OP == Op::Layer && DYN && !PROJECT), "STASH: dynamic layer given z");
  extern __shared__ float4 stash_x[];
  T* const stash = STASH ? reinterpret_cast<T*>(stash_x) : nullptr;
  constexpr int NB = n_bound<N>();
  constexpr int SLOTS = DYN ? TM : 1;
  __shared__ Shared<NB, TM, SLOTS> s;
  const int n = N ? N : a.n;
  const int64_t C = HIDDEN ? HIDDEN : a.hidden;
  const int64_t t0 = int64_t(blockIdx.x) * TM;
  const int64_t remaining = a.tokens - t0;
  const int nt = OP == Op::Coeffs && !DYN ? 1 : (remaining < TM ? int(remaining) : TM);
  const int warp = threadIdx.x / kWarp;

  // Phases 1 and 2: the coefficients of the block's tokens (or the one static H).
  if (DYN && OP == Op::Layer && !PROJECT && a.in<float>(kHResIn)) {  // H from the caller
    load_token_coefficients<NB, TM, SLOTS>(a, n, t0, nt, 0, s);
  } else if constexpr (DYN && OP != Op::Post) {
    if constexpr (!PROJECT) {  // z (and r, unless null) from a projection or the saved forward
      const int m = num_logits(n);
      for (int idx = threadIdx.x; idx < nt * m; idx += kThreads)
        s.z[idx / m][idx % m] = projected_logit(a, t0 + idx / m, m, idx % m);
      if (a.p[kRIn] || a.p[kSqIn])
        for (int t = threadIdx.x; t < nt; t += kThreads)
          s.r[t] = projected_rms(a, t0 + t, int64_t(n) * C);
      else
        token_norms<T, NB, TM, SLOTS>(a, int64_t(n) * C, t0, nt, s, stash);
      __syncthreads();
    } else {
      project<T, NB, TM, SLOTS>(a, n, C, t0, nt, s);
      for (int t = threadIdx.x; t < nt; t += kThreads)
        s.r[t] = token_rms(s.sum_sq[t], int64_t(n) * C, a.eps_rms);
      __syncthreads();
    }
    for (int t = warp; t < nt; t += kWarps) {
      const float r = s.r[t];
      coefficients<NB, TM, SLOTS>(a, n, t, s.z[t], r, s);
      if (blockIdx.y == 0) store_coefficients<NB, TM, SLOTS>(a, n, t, t0 + t, s);
    }
  } else if constexpr (DYN) {  // post with per-token H from the caller
    load_token_coefficients<NB, TM, SLOTS>(a, n, t0, nt, 0, s);
  } else if (OP != Op::Coeffs && a.in<float>(kHResIn)) {
    load_static_coefficients<NB, TM, SLOTS>(a, n, s);
  } else if (warp == 0) {
    coefficients<NB, TM, SLOTS>(a, n, 0, nullptr, 1.0f, s);
    if (blockIdx.x == 0 && blockIdx.y == 0) store_coefficients<NB, TM, SLOTS>(a, n, 0, 0, s);
  }
  __syncthreads();
  if constexpr (OP == Op::Coeffs) return;

  // Phase 3: this block's columns [c_lo, c_hi) of each of its tokens.
  const int64_t chunk = ((C + gridDim.y - 1) / gridDim.y + VEC - 1) / VEC * VEC;
  const int64_t c_lo = int64_t(blockIdx.y) * chunk;
  const int64_t c_hi = c_lo + chunk < C ? c_lo + chunk : C;
  const T* x = a.in<T>(kX);
  T* out = a.out<T>(kOut);
  float* u32 = a.out<float>(kUF32);
  const int64_t token_elems = int64_t(n) * C;

  if constexpr (OP == Op::Pre || OP == Op::Post) {
#pragma unroll
    for (int t = 0; t < TM; ++t) {
      if (t >= nt) break;
      const int hs = DYN ? t : 0;
      const T* xt = x + (t0 + t) * token_elems;
      for (int64_t c = c_lo + int64_t(threadIdx.x) * VEC; c < c_hi; c += int64_t(kThreads) * VEC) {
        if constexpr (OP == Op::Pre) {
          if (u32)
            pre_vector<T, NB, VEC>(xt, u32 + (t0 + t) * C, C, n, s.h_pre[hs], c);
          else
            pre_vector<T, NB, VEC>(xt, out + (t0 + t) * C, C, n, s.h_pre[hs], c);
        } else {
          float yv[VEC];
          load_pack<T, VEC>(a.in<T>(kY) + (t0 + t) * C + c, yv);
          post_vector<T, NB, VEC>(xt, yv, out + (t0 + t) * token_elems, C, n, s.h_post[hs],
                                  s.h_res[hs], c);
        }
      }
    }
  } else if constexpr (OP == Op::Layer) {
    // F = RMSNorm(u)·w: pass A reduces Σu² per token, pass B (layer_vector) writes x_next.
    float sq[TM];
#pragma unroll
    for (int t = 0; t < TM; ++t) {
      sq[t] = 0.0f;
      if (t >= nt) continue;
      const int hs = DYN ? t : 0;
      const T* xt = STASH ? stash + t * token_elems : x + (t0 + t) * token_elems;
      for (int64_t c = int64_t(threadIdx.x) * VEC; c < C; c += int64_t(kThreads) * VEC) {
        float u[VEC];
        pre_mix<T, NB, VEC>(xt, C, n, s.h_pre[hs], c, u);
#pragma unroll
        for (int v = 0; v < VEC; ++v) sq[t] += u[v] * u[v];
      }
    }
    const float sum_sq = token_sums(sq, s, TM);
    if (threadIdx.x < TM) s.sum_sq[threadIdx.x] = 1.0f / token_rms(sum_sq, C, a.eps_rms);
    __syncthreads();
    // This block's rows of x_next and its columns: all, or its group of grid.y and chunk of
    // grid.z (mhc/layer_split.h).
    const int rows = NB >= kLayerRowsMinN ? layer_group_rows(n, int(gridDim.y)) : NB;
    const int i_lo = NB >= kLayerRowsMinN ? int(blockIdx.y) * rows : 0;
    const int i_hi = i_lo + rows;
    const int64_t cols = layer_chunk_cols(C, int64_t(gridDim.z), VEC);
    const int64_t col_lo = NB >= kLayerRowsMinN ? int64_t(blockIdx.z) * cols : 0;
    const int64_t col_hi = NB >= kLayerRowsMinN && col_lo + cols < C ? col_lo + cols : C;
#pragma unroll
    for (int t = 0; t < TM; ++t) {
      if (t >= nt) break;
      const int hs = DYN ? t : 0;
      const float inv_rms = s.sum_sq[t];
      const T* xt = STASH ? stash + t * token_elems : x + (t0 + t) * token_elems;
      for (int64_t c = col_lo + int64_t(threadIdx.x) * VEC; c < col_hi;
           c += int64_t(kThreads) * VEC)
        layer_vector<T, NB, VEC>(xt, out + (t0 + t) * token_elems, C, n, s.h_pre[hs], s.h_post[hs],
                                 s.h_res[hs], inv_rms, a.in<float>(kNormWeight), c, i_lo, i_hi);
    }
  }
}

// Copies one token's x (K elements, 16-byte aligned) into shared memory: asynchronously
// where the GPU can (sm_80+: the copy overlaps the block's work on the previous token and
// is complete after stage_wait and a barrier), else through registers.
template <typename T>
MHC_DEV void stage_copy(T* dst, const T* src, int64_t K) {
  constexpr int V = 16 / int(sizeof(T));
  for (int64_t k = int64_t(threadIdx.x) * V; k < K; k += int64_t(kThreads) * V)
    async_copy16(dst + k, src + k);
  async_commit();
}

// The fused layer with H given or static, each token's x staged in shared memory: DRAM
// sees x once, where token_kernel's second pass re-reads it from L2, in which a full GPU's
// tokens in flight (≈ 67 MB at n = 4, C = 4096, tile 4) do not fit. A block walks its TM
// tokens through two buffers: token t + 1 is copied while the block works on token t. The
// arithmetic and its order are token_kernel's, so both give bitwise the same results.
// DYN: per-token H from the caller (kHPreIn, kHPostIn, kHResIn: one coefficients launch on
// the projection's z and r), loaded with the token's copy. Dynamic H computed here would
// put each token's Sinkhorn (one warp, the block waiting) between its copy and its passes,
// which measured slower (notes/PERF.md, session 8). A grid of 2 blocks an SM, each walking
// every grid-th token, measured slower than a block a tile (H200, session 14: the dynamic
// layer's forward 0.611 → 0.663 ms at n = 4, T = 16384, C = 4096).
template <typename T, int N, int HIDDEN, int TM, int VEC, bool DYN>
__global__ void __launch_bounds__(kThreads) staged_layer_kernel(Args a) {
  constexpr int NB = n_bound<N>();
  constexpr int SLOTS = DYN ? 2 : 1;  // token t's H in slot t % 2
  __shared__ Shared<NB, TM, SLOTS> s;
  extern __shared__ float4 staged_x[];
  const int n = N ? N : a.n;
  const int64_t C = HIDDEN ? HIDDEN : a.hidden;
  const int64_t K = int64_t(n) * C;
  const int64_t t0 = int64_t(blockIdx.x) * TM;
  const int64_t remaining = a.tokens - t0;
  const int nt = remaining < TM ? int(remaining) : TM;
  const T* x = a.in<T>(kX);
  T* const staged = reinterpret_cast<T*>(staged_x);  // token t in buffer t % 2

  stage_copy(staged, x + t0 * K, K);
  if constexpr (DYN) {
    load_token_coefficients<NB, TM, SLOTS>(a, n, t0, 1, 0, s);
  } else if (a.in<float>(kHResIn)) {
    load_static_coefficients<NB, TM, SLOTS>(a, n, s);
  } else if (threadIdx.x / kWarp == 0) {
    coefficients<NB, TM, SLOTS>(a, n, 0, nullptr, 1.0f, s);
    if (blockIdx.x == 0) store_coefficients<NB, TM, SLOTS>(a, n, 0, 0, s);
  }
  const int64_t c0 = int64_t(threadIdx.x) * VEC, cstep = int64_t(kThreads) * VEC;
  for (int t = 0; t < nt; ++t) {
    const int hs = DYN ? t % 2 : 0;
    const T* xs = staged + (t % 2) * K;
    stage_wait();
    __syncthreads();  // token t is staged; every thread is done with token t - 1's buffer
    if (t + 1 < nt) {
      stage_copy(staged + ((t + 1) % 2) * K, x + (t0 + t + 1) * K, K);
      if constexpr (DYN) load_token_coefficients<NB, TM, SLOTS>(a, n, t0 + t + 1, 1, 1 - hs, s);
    }
    float sq = 0.0f;
    for (int64_t c = c0; c < C; c += cstep) {
      float u[VEC];
      pre_mix<T, NB, VEC>(xs, C, n, s.h_pre[hs], c, u);
#pragma unroll
      for (int v = 0; v < VEC; ++v) sq += u[v] * u[v];
    }
    const float inv_rms = block_inv_rms(sq, C, a.eps_rms, s);
    T* ot = a.out<T>(kOut) + (t0 + t) * K;
    for (int64_t c = c0; c < C; c += cstep)
      layer_vector<T, NB, VEC>(xs, ot, C, n, s.h_pre[hs], s.h_post[hs], s.h_res[hs], inv_rms,
                               a.in<float>(kNormWeight), c);
  }
}

// The fused layer with x in registers: a block a token, each thread R vectors of VEC
// columns of every stream, read once from DRAM and kept for pass B. No shared-memory
// staging, so an SM holds as many blocks as registers allow, each with its whole token's
// loads in flight (staged_layer_kernel: two blocks, by their 64 KB of shared memory). R
// is HIDDEN's vectors a thread, or as many as the budget allows where C is not fixed
// (columns past C predicated off). Bitwise the same results as staged_layer_kernel: the
// same sums in the same order.
constexpr int kResidentMaxPacks = 16;  // the most vectors a thread holds (64 registers of x)
constexpr int64_t kResidentMinStaticTokens = 8192;

template <int N, int HIDDEN, int VEC>
MHC_CX int resident_vectors() {
  return HIDDEN ? (HIDDEN + kThreads * VEC - 1) / (kThreads * VEC)
                : (N ? kResidentMaxPacks / N : 0);
}

template <typename T, int N, int HIDDEN, int VEC, bool DYN>
__global__ void __launch_bounds__(kThreads) resident_layer_kernel(Args a) {
  static_assert(N > 0, "the resident layer: n fixed");
  constexpr int R = resident_vectors<N, HIDDEN, VEC>();
  static_assert(R > 0 && R * N <= kResidentMaxPacks, "x past the register budget");
  __shared__ Shared<N, 1, 1> s;
  const int64_t C = HIDDEN ? HIDDEN : a.hidden;
  const int64_t K = N * C;
  const int64_t tok = blockIdx.x;
  const T* xt = a.in<T>(kX) + tok * K;
  Pack<T, VEC> xp[R][N];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t c = (int64_t(r) * kThreads + threadIdx.x) * VEC;
    if (c < C)
#pragma unroll
      for (int j = 0; j < N; ++j) xp[r][j] = load_raw_ro<T, VEC>(xt + j * C + c);
  }
  if constexpr (DYN) {
    load_token_coefficients<N, 1, 1>(a, N, tok, 1, 0, s);
  } else if (a.in<float>(kHResIn)) {
    load_static_coefficients<N, 1, 1>(a, N, s);
  } else if (threadIdx.x / kWarp == 0) {
    coefficients<N, 1, 1>(a, N, 0, nullptr, 1.0f, s);
    if (blockIdx.x == 0) store_coefficients<N, 1, 1>(a, N, 0, 0, s);
  }
  __syncthreads();
  float sq = 0.0f;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t c = (int64_t(r) * kThreads + threadIdx.x) * VEC;
    if (c < C) {
      float u[VEC];
      pre_mix_packs<T, N, VEC>(xp[r], N, s.h_pre[0], u);
#pragma unroll
      for (int v = 0; v < VEC; ++v) sq += u[v] * u[v];
    }
  }
  const float inv_rms = block_inv_rms(sq, C, a.eps_rms, s);
  const float* w = a.in<float>(kNormWeight);
  T* ot = a.out<T>(kOut) + tok * K;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t c = (int64_t(r) * kThreads + threadIdx.x) * VEC;
    if (c < C) {
      float xs[N][VEC], y[VEC];
#pragma unroll
      for (int j = 0; j < N; ++j)
#pragma unroll
        for (int v = 0; v < VEC; ++v) xs[j][v] = to_float(xp[r][j].v[v]);
      pre_mix_packs<T, N, VEC>(xp[r], N, s.h_pre[0], y);
#pragma unroll
      for (int v = 0; v < VEC; ++v) y[v] = y[v] * inv_rms * w[c + v];
      post_rows<T, N, VEC>(xs, y, ot, C, N, s.h_post[0], s.h_res[0], c);
    }
  }
}

// Shared memory a staged block may take, its two token buffers and Shared together: two
// blocks an SM on CUDA (with the opt-in limit); an AMD workgroup's 64 KB of LDS.
#if defined(MHC_HIP)
constexpr int64_t kStageSmemBytes = 64 * 1024;
#else
constexpr int64_t kStageSmemBytes = 100 * 1024;
#endif
// The same for token_kernel's stash: three blocks an SM on CUDA (its 80 registers allow
// three); an AMD workgroup's 64 KB of LDS.
#if defined(MHC_HIP)
constexpr int64_t kStashSmemBytes = 64 * 1024;
#else
constexpr int64_t kStashSmemBytes = 72 * 1024;
#endif

// Launches kernel(a) with smem bytes of dynamic shared memory, past the 48 KB default.
template <typename Kernel>
int launch_with_smem(Kernel* kernel, dim3 grid, size_t smem, stream_t stream, const Args& a) {
  const error_t err = set_dynamic_smem(kernel, smem);
  if (err != kSuccess) return int(err);
  kernel<<<grid, kThreads, smem, stream>>>(a);
  return int(last_error());
}

// Host launcher shared by every generated variant.
template <typename T, int N, int HIDDEN, int TM, Op OP, bool DYN>
int launch(const Args& a) {
  if (a.n < 1 || a.n > kMaxN || (N && a.n != N)) return kBadN;
  if (HIDDEN && a.hidden != HIDDEN) return kBadHidden;
  const bool static_coeffs = OP == Op::Coeffs && !DYN;
  const int64_t blocks = static_coeffs ? 1 : (a.tokens + TM - 1) / TM;
  if (blocks == 0) return kOk;
  const stream_t stream = static_cast<stream_t>(a.stream);
  if (!DYN && OP != Op::Coeffs && a.p[kHResIn] && (!a.p[kHPreIn] || !a.p[kHPostIn]))
    return kMissingInput;  // a given static H comes whole
  // Phase 1 here: dynamic coefficients, pre and layer given no z (nor, the layer, H).
  const bool project =
      DYN && OP != Op::Post && a.p[kZIn] == nullptr && !(OP == Op::Layer && a.p[kHResIn]);
  if constexpr (OP == Op::Coeffs) {
    if constexpr (DYN && N > 0 && N <= kThreadCoeffsMaxN) {
      if (a.p[kZIn] && (a.p[kRIn] || a.p[kSqIn])) {
        const dim3 grid{unsigned((a.tokens + kThreadCoeffsBlock - 1) / kThreadCoeffsBlock)};
        coeffs_thread_kernel<N><<<grid, kThreadCoeffsBlock, 0, stream>>>(a);
        return int(last_error());
      }
    }
    const dim3 grid{unsigned(blocks)};
    if (project)
      token_kernel<T, N, HIDDEN, TM, OP, DYN, 1, DYN><<<grid, kThreads, 0, stream>>>(a);
    else
      token_kernel<T, N, HIDDEN, TM, OP, DYN, 1, false><<<grid, kThreads, 0, stream>>>(a);
  } else {
    constexpr int VEC = vec_width<T, n_bound<N>()>();
    const int vb = VEC * int(sizeof(T));
    const bool vec_ok = a.hidden % VEC == 0 && aligned_to(a.p[kX], vb) && aligned_to(a.p[kY], vb) &&
                        aligned_to(a.p[kOut], vb) && aligned_to(a.p[kUF32], VEC * 4);
    // Split C over grid.y where no reduction over C is needed: short token
    // counts still fill the GPU.
    const bool split = OP == Op::Post || (OP == Op::Pre && !DYN);
    const int64_t per_block = int64_t(kThreads) * VEC * 4;
    // The layer's row groups and column chunks: not where it projects on CUDA cores (ROCm),
    // which each block would repeat whole.
    const bool layer_split = OP == Op::Layer && !project;
    const int64_t chunks = split         ? (a.hidden + per_block - 1) / per_block
                           : layer_split ? layer_row_groups(n_bound<N>(), blocks, a.n)
                                         : 1;
    const int64_t col_chunks =
        layer_split ? layer_column_chunks(n_bound<N>(), blocks * chunks, a.hidden, kThreads * VEC)
                    : 1;
    const dim3 grid(unsigned(blocks), unsigned(chunks < 65535 ? chunks : 65535),
                    unsigned(col_chunks));
    // Phase 1 in this kernel exists only for dynamic pre and layer.
    constexpr bool P = DYN && OP != Op::Post;
    // The fused layer copies whole tokens of x into shared memory (16-byte rows) where they fit.
    const int64_t token_bytes = int64_t(a.n) * a.hidden * int64_t(sizeof(T));
    const bool rows16 = vec_ok && token_bytes % 16 == 0 && aligned_to(a.p[kX], 16);
    // The fused layer with H given (dynamic, per token) or static: x in registers where
    // the token fits, else staged where two tokens fit.
    const bool h_given = a.p[kHResIn] != nullptr;
    if (OP == Op::Layer && DYN && h_given && (!a.p[kHPreIn] || !a.p[kHPostIn]))
      return kMissingInput;  // a given H comes whole
    constexpr int R = resident_vectors<N, HIDDEN, VEC>();
    if constexpr (OP == Op::Layer && N > 0 && R > 0 && R * N <= kResidentMaxPacks) {
      // Static H computed in the kernel: each block runs the Sinkhorn, which short token
      // counts do not hide (H200, session 19: 2560 × 1280 × 4, 0.032 → 0.040 ms).
      const bool resident_ok = DYN ? h_given : (h_given || a.tokens >= kResidentMinStaticTokens);
      if (resident_ok && rows16 && a.hidden <= int64_t(R) * kThreads * VEC) {
        resident_layer_kernel<T, N, HIDDEN, VEC, DYN>
            <<<unsigned(a.tokens), kThreads, 0, stream>>>(a);
        return int(last_error());
      }
    }
    if constexpr (OP == Op::Layer && DYN) {
      if (h_given) {
        const int64_t fixed = int64_t(sizeof(Shared<n_bound<N>(), TM, 2>));
        if (rows16 && 2 * token_bytes + fixed <= kStageSmemBytes)
          return launch_with_smem(staged_layer_kernel<T, N, HIDDEN, TM, VEC, true>,
                                  dim3(unsigned(blocks)), 2 * size_t(token_bytes), stream, a);
      }
      const int64_t smem = int64_t(TM) * token_bytes;
      const int64_t fixed = int64_t(sizeof(Shared<n_bound<N>(), TM, TM>));
      if (!h_given && rows16 && !project && !a.p[kRIn] && !a.p[kSqIn] &&
          smem + fixed <= kStashSmemBytes)
        return launch_with_smem(token_kernel<T, N, HIDDEN, TM, OP, DYN, VEC, false, true>, grid,
                                size_t(smem), stream, a);
    }
    if constexpr (OP == Op::Layer && !DYN) {
      const int64_t fixed = int64_t(sizeof(Shared<n_bound<N>(), TM, 1>));
      if (rows16 && 2 * token_bytes + fixed <= kStageSmemBytes)
        return launch_with_smem(staged_layer_kernel<T, N, HIDDEN, TM, VEC, false>,
                                dim3(unsigned(blocks)), 2 * size_t(token_bytes), stream, a);
    }
    if (vec_ok && project)
      token_kernel<T, N, HIDDEN, TM, OP, DYN, VEC, P><<<grid, kThreads, 0, stream>>>(a);
    else if (vec_ok)
      token_kernel<T, N, HIDDEN, TM, OP, DYN, VEC, false><<<grid, kThreads, 0, stream>>>(a);
    else if (project)
      token_kernel<T, N, HIDDEN, TM, OP, DYN, 1, P><<<grid, kThreads, 0, stream>>>(a);
    else
      token_kernel<T, N, HIDDEN, TM, OP, DYN, 1, false><<<grid, kThreads, 0, stream>>>(a);
  }
  return int(last_error());
}

}  // namespace mhc
