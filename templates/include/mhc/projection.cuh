// The dynamic-H projection z = x̄·φ and r = RMS(x̄) on tensor cores (bf16 x).
//
// φ (fp32) is split into two bf16 operands, φ ≈ hi + lo: two bf16 mma.sync per tile
// keep about 17 bits of φ, and x (bf16) is exact, so z matches an fp32 product to
// ~1e-6. A block owns 16·MT tokens, up to 64 logit columns and one of `splits` chunks
// of K; its 8 warps split the chunk and are summed in warp order (deterministic). With
// more than one chunk (few tokens: too few blocks to fill the GPU otherwise) each chunk
// writes partial sums, which the caller adds in chunk order.
//
// Two ways to feed the mma: the wide path (n·C a multiple of 8, φ split by the caller
// into φᵀ hi and lo, [m, K] bf16) loads 16 bytes of x and of each of hi, lo per lane
// for two k16 steps; the narrow path loads bf16 pairs of x and splits fp32 φ as it
// loads it (any even n·C; no copy of φ, for short sequences with a large φ).
#pragma once

#include "args.h"
#include "platform.h"
#include "token_kernel.cuh"

namespace mhc {

#if defined(MHC_CUDA)

constexpr int kProjColTiles = 8;  // 8 columns each: 64 logit columns per block

// Two consecutive bf16 of row `row` at k, as the mma's packed operand; zero
// outside [0, rows) × [0, K). K is even, so k < K implies k + 1 < K.
MHC_DEV uint32_t load_pair(const uint16_t* base, int64_t row, int64_t rows, int64_t K, int64_t k) {
  if (row >= rows || k >= K) return 0u;
  return *reinterpret_cast<const uint32_t*>(base + row * K + k);
}

// φ[k][col] and φ[k+1][col] as packed bf16 pairs hi and lo, φ ≈ hi + lo
// (zero outside [0, K) × [0, m)).
MHC_DEV void load_phi_pair(const float* phi, int64_t col, int m, int64_t K, int64_t k, uint32_t& hi,
                           uint32_t& lo) {
  float p0 = 0.0f, p1 = 0.0f;
  if (col < m && k < K) {
    p0 = phi[k * m + col];
    p1 = phi[(k + 1) * m + col];
  }
  const bf16 h0 = from_float<bf16>(p0), h1 = from_float<bf16>(p1);
  const bf16 l0 = from_float<bf16>(p0 - to_float(h0)), l1 = from_float<bf16>(p1 - to_float(h1));
  hi = uint32_t(h0.bits) | (uint32_t(h1.bits) << 16);
  lo = uint32_t(l0.bits) | (uint32_t(l1.bits) << 16);
}

MHC_DEV float pair_sq(uint32_t v) {
  bf16 lo{uint16_t(v & 0xffffu)}, hi{uint16_t(v >> 16)};
  const float a = to_float(lo), b = to_float(hi);
  return a * a + b * b;
}

MHC_DEV void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Column tiles a block holds: all of m's for a compile-time n, else the most.
template <int N>
MHC_CX int proj_col_tiles() {
  return N && (num_logits(N) + 7) / 8 < kProjColTiles ? (num_logits(N) + 7) / 8 : kProjColTiles;
}

// 16 bytes at base + row·K + k, zero outside [0, rows) × [k, k_end): with K and k multiples
// of 8, a group of 8 lies wholly inside or outside.
MHC_DEV uint4 load_group(const uint16_t* base, int64_t row, int64_t rows, int64_t K, int64_t k,
                         int64_t k_end) {
  if (row >= rows || k >= k_end) return make_uint4(0u, 0u, 0u, 0u);
  return *reinterpret_cast<const uint4*>(base + row * K + k);
}

template <int N, int HIDDEN, int MT, bool WIDE>
__global__ void __launch_bounds__(kThreads) projection_kernel(Args a) {
  constexpr int NT = proj_col_tiles<N>();
  constexpr int ROWS = 16 * MT;
  __shared__ float red[ROWS][8 * NT + 1];
  __shared__ float red_sq[ROWS];
  const int n = N ? N : a.n;
  const int m = num_logits(n);
  const int m_pad = (m + 7) / 8 * 8;
  const int64_t C = HIDDEN ? HIDDEN : a.hidden;
  const int64_t K = int64_t(n) * C;
  const int64_t T = a.tokens;
  const int64_t t0 = int64_t(blockIdx.x) * ROWS;
  const int col0 = int(blockIdx.y) * 8 * NT;
  const int tiles = (m_pad - col0) / 8 < NT ? (m_pad - col0) / 8 : NT;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int g = lane / 4, q = lane % 4;
  const uint16_t* x = a.in<uint16_t>(kX);
  const float* phi = a.in<float>(kPhi);

  float acc[MT][NT][4];
  float sq[MT][2];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    sq[i][0] = sq[i][1] = 0.0f;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
  }

  // This block's chunk of K, a multiple of 32 wide: a step's k lie in one chunk.
  const int64_t chunk = (K + 32 * int64_t(gridDim.z) - 1) / (32 * int64_t(gridDim.z)) * 32;
  const int64_t k_begin = int64_t(blockIdx.z) * chunk;
  const int64_t k_end = k_begin + chunk < K ? k_begin + chunk : K;
  if constexpr (WIDE) {
    // Lane (g, q) holds k0 + 8q .. 8q+7 of its rows and columns: the mma's k order is
    // permuted alike for both operands (k 2q, 2q+1, 2q+8, 2q+9 of the first k16 step are
    // 8q .. 8q+3, of the second 8q+4 .. 8q+7), which leaves the products' sum unchanged.
    const uint16_t* phi_hi = a.in<uint16_t>(kPhiHi);
    const uint16_t* phi_lo = a.in<uint16_t>(kPhiLo);
    for (int64_t k0 = k_begin + int64_t(warp) * 32; k0 < k_end; k0 += kWarps * 32) {
      const int64_t k = k0 + 8 * q;
      uint4 xr[MT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          xr[i][h] = load_group(x, t0 + i * 16 + g + 8 * h, T, K, k, k_end);
          sq[i][h] +=
              pair_sq(xr[i][h].x) + pair_sq(xr[i][h].y) + pair_sq(xr[i][h].z) + pair_sq(xr[i][h].w);
        }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        if (j >= tiles) break;
        const int64_t col = col0 + j * 8 + g;
        const uint4 hi = load_group(phi_hi, col, m, K, k, k_end);
        const uint4 lo = load_group(phi_lo, col, m, K, k, k_end);
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          const uint32_t a0[4] = {xr[i][0].x, xr[i][1].x, xr[i][0].y, xr[i][1].y};
          const uint32_t a1[4] = {xr[i][0].z, xr[i][1].z, xr[i][0].w, xr[i][1].w};
          mma_bf16(acc[i][j], a0, hi.x, hi.y);
          mma_bf16(acc[i][j], a0, lo.x, lo.y);
          mma_bf16(acc[i][j], a1, hi.z, hi.w);
          mma_bf16(acc[i][j], a1, lo.z, lo.w);
        }
      }
    }
  } else {
    for (int64_t k0 = k_begin + int64_t(warp) * 16; k0 < k_end; k0 += kWarps * 16) {
      uint32_t af[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int64_t r0 = t0 + i * 16 + g, r1 = r0 + 8;
        af[i][0] = load_pair(x, r0, T, K, k0 + 2 * q);
        af[i][1] = load_pair(x, r1, T, K, k0 + 2 * q);
        af[i][2] = load_pair(x, r0, T, K, k0 + 2 * q + 8);
        af[i][3] = load_pair(x, r1, T, K, k0 + 2 * q + 8);
        sq[i][0] += pair_sq(af[i][0]) + pair_sq(af[i][2]);
        sq[i][1] += pair_sq(af[i][1]) + pair_sq(af[i][3]);
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        if (j >= tiles) break;
        const int64_t col = col0 + j * 8 + g;
        uint32_t h0, h1, l0, l1;
        load_phi_pair(phi, col, m, K, k0 + 2 * q, h0, l0);
        load_phi_pair(phi, col, m, K, k0 + 2 * q + 8, h1, l1);
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          mma_bf16(acc[i][j], af[i], h0, h1);
          mma_bf16(acc[i][j], af[i], l0, l1);
        }
      }
    }
  }

  // Rows g and g+8 of each tile: the quad's four lanes hold disjoint k.
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      sq[i][h] += shfl_xor(sq[i][h], 1);
      sq[i][h] += shfl_xor(sq[i][h], 2);
    }
  // Warps add their partial sums in warp order: a fixed summation order.
  for (int w = 0; w < kWarps; ++w) {
    if (warp == w) {
#pragma unroll
      for (int i = 0; i < MT; ++i) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          if (j >= tiles) break;
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = i * 16 + g + (e >= 2 ? 8 : 0), col = j * 8 + 2 * q + (e & 1);
            red[row][col] = (w == 0 ? 0.0f : red[row][col]) + acc[i][j][e];
          }
        }
        if (q == 0) {
          red_sq[i * 16 + g] = (w == 0 ? 0.0f : red_sq[i * 16 + g]) + sq[i][0];
          red_sq[i * 16 + g + 8] = (w == 0 ? 0.0f : red_sq[i * 16 + g + 8]) + sq[i][1];
        }
      }
    }
    __syncthreads();
  }
  const bool partial = gridDim.z > 1;  // z and Σx̄² of this chunk, at [blockIdx.z]
  float* z = a.out<float>(kZOut) + (partial ? int64_t(blockIdx.z) * T * m : 0);
  float* r = a.out<float>(kROut) + (partial ? int64_t(blockIdx.z) * T : 0);
  for (int idx = threadIdx.x; idx < ROWS * 8 * tiles; idx += kThreads) {
    const int row = idx / (8 * tiles), col = idx % (8 * tiles);
    if (t0 + row < T && col0 + col < m) z[(t0 + row) * m + col0 + col] = red[row][col];
  }
  if (blockIdx.y == 0)
    for (int row = threadIdx.x; row < ROWS; row += kThreads)
      if (t0 + row < T) r[t0 + row] = partial ? red_sq[row] : token_rms(red_sq[row], K, a.eps_rms);
}

template <typename T, int N, int HIDDEN, int TM, Op OP, bool DYN>
int launch_projection(const Args& a) {
  static_assert(sizeof(T) == 2, "the tensor-core projection takes bf16 x");
  if (a.n < 1 || a.n > kMaxN || (N && a.n != N)) return kBadN;
  if (HIDDEN && a.hidden != HIDDEN) return kBadHidden;
  const int64_t K = int64_t(a.n) * a.hidden;
  if (K % 2 != 0 || !aligned_to(a.p[kX], 4)) return kBadHidden;  // pairs of bf16
  const bool wide = a.p[kPhiHi] != nullptr;
  if (wide && (K % 8 != 0 || a.p[kPhiLo] == nullptr || !aligned_to(a.p[kX], 16) ||
               !aligned_to(a.p[kPhiHi], 16) || !aligned_to(a.p[kPhiLo], 16)))
    return kBadHidden;  // groups of 8 bf16
  if (a.tokens == 0) return kOk;
  const int m_pad = (num_logits(a.n) + 7) / 8 * 8;
  const dim3 grid(unsigned((a.tokens + 16 * TM - 1) / (16 * TM)),
                  unsigned((m_pad + 8 * kProjColTiles - 1) / (8 * kProjColTiles)),
                  unsigned(a.splits < 1 ? 1 : a.splits));
  const stream_t stream = static_cast<stream_t>(a.stream);
  if (wide)
    projection_kernel<N, HIDDEN, TM, true><<<grid, kThreads, 0, stream>>>(a);
  else
    projection_kernel<N, HIDDEN, TM, false><<<grid, kThreads, 0, stream>>>(a);
  return int(last_error());
}

#endif  // MHC_CUDA

}  // namespace mhc
