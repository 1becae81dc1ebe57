// Dynamic H's projection in one pass over x: z = x̄·φ and r = rms(x̄) for 64 tokens a
// block, on tensor cores (CUDA, bf16 x, n ≤ 8). cuBLAS gives z alone, so the kernels that
// took its z read x again for r, and a token's Sinkhorn (which needs r) sat between that
// read and the token's mixing. With r here, the coefficients run in a launch of their own
// and the mixing kernels read x once.
//
// x (kX) is [T, K = n·C] bf16, exact as an mma operand; φ comes split into bf16 hi + lo
// parts, transposed and padded (kPhiSplitT: [2, mp, K], mp = m rounded up to 8, rows past m
// zero), so that z ≈ x̄·φ_hi + x̄·φ_lo with fp32 accumulation: the cuBLAS path's precision.
// x and φ tiles stream through shared memory by cp.async, kProjStages deep. Σx̄² comes from
// the A fragments the mma's read: each lane sums its columns, then a quad sums in a fixed
// order, so r is bitwise reproducible (as is z: fixed k order, no split of K).
#pragma once

#include "args.h"
#include "platform.h"
#include "token_math.h"

namespace mhc {

enum class ProjOp { Proj };

constexpr int kProjMaxN = 8;  // m = 80 logits: ten n8 tiles of accumulators a lane

MHC_CX int proj_cols(int n) { return (n * n + 2 * n + 7) / 8 * 8; }  // mp

#if defined(MHC_CUDA)
constexpr int kProjTokens = 64;  // 4 warps × the mma's m16
constexpr int kProjThreads = kProjTokens / 16 * 32;
constexpr int kProjK = 64;           // k a stage
constexpr int kProjLd = kProjK + 8;  // a 144-byte row: the fragment loads hit 32 banks

// Stages in flight: 4 where φ's tile is small (n ≤ 4: 64 KB, 3 blocks an SM), else 3.
template <int NB>
MHC_CX int proj_stages() {
  return NB <= 4 ? 4 : 3;
}

template <int NB>
struct ProjShared {
  bf16 x[proj_stages<NB>()][kProjTokens][kProjLd];
  bf16 phi[proj_stages<NB>()][2 * proj_cols(NB)][kProjLd];
};

MHC_DEV uint32_t lds32(const bf16* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Σ of the squares of a bf16 pair.
MHC_DEV float sq_pair(uint32_t v) {
  const float lo = __uint_as_float(v << 16), hi = __uint_as_float(v & 0xffff0000u);
  return lo * lo + hi * hi;
}

// d += a·b for one m16n8k16 tile (row-major a, column-major b, fp32 d).
MHC_DEV void proj_mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <int N>
__global__ void __launch_bounds__(kProjThreads) projection_kernel(Args a) {
  constexpr int NB = N ? N : kProjMaxN;
  constexpr int S = proj_stages<NB>();
  constexpr int kTiles = proj_cols(NB) / 8;  // n8 tiles, the bound
  extern __shared__ float4 proj_smem[];
  auto& s = *reinterpret_cast<ProjShared<NB>*>(proj_smem);
  const int n = N ? N : a.n;
  const int m = n * n + 2 * n;
  const int mp = proj_cols(n);
  const int tiles = mp / 8;
  const int64_t K = int64_t(n) * a.hidden;
  const int64_t t0 = int64_t(blockIdx.x) * kProjTokens;
  const int chunks = int(K / kProjK);
  const bf16* x = a.in<bf16>(kX);
  const bf16* phi = a.in<bf16>(kPhiSplitT);

  // One stage: the block's 64 rows of x (rows past T read the last token; never stored)
  // and 2·mp rows of φ, kProjK columns each, in 16-byte pieces.
  auto load_stage = [&](int stage, int chunk) {
    const int64_t k0 = int64_t(chunk) * kProjK;
    for (int i = threadIdx.x; i < kProjTokens * (kProjK / 8); i += kProjThreads) {
      const int row = i / (kProjK / 8), piece = i % (kProjK / 8);
      const int64_t tok = t0 + row < a.tokens ? t0 + row : a.tokens - 1;
      async_copy16(&s.x[stage][row][piece * 8], x + tok * K + k0 + piece * 8);
    }
    for (int i = threadIdx.x; i < 2 * mp * (kProjK / 8); i += kProjThreads) {
      const int row = i / (kProjK / 8), piece = i % (kProjK / 8);
      async_copy16(&s.phi[stage][row][piece * 8], phi + int64_t(row) * K + k0 + piece * 8);
    }
  };

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int g = lane / 4, c2 = 2 * (lane % 4);  // the fragment's row and column pair
  const int r0 = warp * 16 + g;                 // this lane's rows r0 and r0 + 8
  float acc[kTiles][4];
#pragma unroll
  for (int j = 0; j < kTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;
  float sq[2] = {0.0f, 0.0f};

#pragma unroll
  for (int st = 0; st < S - 1; ++st) {
    if (st < chunks) load_stage(st, st);
    async_commit();
  }
  for (int chunk = 0; chunk < chunks; ++chunk) {
    async_wait<S - 2>();  // this chunk's copies (this thread's) have landed
    __syncthreads();      // everyone's have; everyone is done with chunk − 1's stage
    const int next = chunk + S - 1;
    if (next < chunks) load_stage(next % S, next);
    async_commit();  // an empty group past the end keeps the count
    const int st = chunk % S;
#pragma unroll
    for (int kk = 0; kk < kProjK; kk += 16) {
      uint32_t af[4];
      af[0] = lds32(&s.x[st][r0][kk + c2]);
      af[1] = lds32(&s.x[st][r0 + 8][kk + c2]);
      af[2] = lds32(&s.x[st][r0][kk + c2 + 8]);
      af[3] = lds32(&s.x[st][r0 + 8][kk + c2 + 8]);
      sq[0] += sq_pair(af[0]) + sq_pair(af[2]);
      sq[1] += sq_pair(af[1]) + sq_pair(af[3]);
#pragma unroll
      for (int j = 0; j < kTiles; ++j) {
        if (j < tiles) {  // decided at compile time where N is
          const bf16* hi = &s.phi[st][j * 8 + g][kk + c2];
          const bf16* lo = &s.phi[st][mp + j * 8 + g][kk + c2];
          const uint32_t bh[2] = {lds32(hi), lds32(hi + 8)};
          const uint32_t bl[2] = {lds32(lo), lds32(lo + 8)};
          proj_mma(acc[j], af, bh);
          proj_mma(acc[j], af, bl);
        }
      }
    }
  }
  async_wait<0>();

  // A quad's four lanes hold a row's columns: sum them in a fixed order.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    sq[h] += shfl_xor(sq[h], 1);
    sq[h] += shfl_xor(sq[h], 2);
  }
  float* z = a.out<float>(kZOut);
  float* r = a.out<float>(kROut);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t tok = t0 + r0 + 8 * h;
    if (tok >= a.tokens) continue;
    if (lane % 4 == 0) r[tok] = token_rms(sq[h], K, a.eps_rms);
#pragma unroll
    for (int j = 0; j < kTiles; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int q = j * 8 + c2 + e;
        if (j < tiles && q < m) z[tok * m + q] = acc[j][2 * h + e];
      }
  }
}
#endif  // MHC_CUDA

// tokens = T, hidden = C, n = n; z (kZOut) [T, m] and r (kROut) [T] fp32 out. n·C must be
// a multiple of kProjK and x, φ 16-byte aligned (mhc_gen.gpu takes this path only then).
template <typename T, int N, int HIDDEN, int TM, ProjOp OP, bool DYN>
int launch_projection(const Args& a) {
  static_assert(sizeof(T) == 2 && HIDDEN == 0 && DYN, "bf16 x, run-time hidden");
#if defined(MHC_CUDA)
  if (a.n < 1 || a.n > kProjMaxN || (N && a.n != N)) return kBadN;
  if (!a.p[kX] || !a.p[kPhiSplitT] || !a.p[kZOut] || !a.p[kROut]) return kMissingInput;
  const int64_t K = int64_t(a.n) * a.hidden;
  if (K % kProjK != 0 || !aligned_to(a.p[kX], 16) || !aligned_to(a.p[kPhiSplitT], 16))
    return kBadHidden;
  if (a.tokens == 0) return kOk;
  const dim3 grid{unsigned((a.tokens + kProjTokens - 1) / kProjTokens)};
  constexpr int NB = N ? N : kProjMaxN;
  auto* kernel = projection_kernel<N>;
  const size_t smem = sizeof(ProjShared<NB>);
  const error_t err = set_dynamic_smem(kernel, smem);
  if (err != kSuccess) return int(err);
  kernel<<<grid, kProjThreads, smem, static_cast<stream_t>(a.stream)>>>(a);
  return int(last_error());
#else
  return kBadN;  // CUDA only: no variant is built for HIP
#endif
}

}  // namespace mhc
