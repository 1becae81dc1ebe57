// Dynamic H's projection in one pass over x: z = x̄·φ and r = rms(x̄), on tensor cores (CUDA, bf16 x,
// n ≤ 8). cuBLAS gives z alone, so the kernels that took its z read x again for r, and a token's
// Sinkhorn (which needs r) sat between that read and the token's mixing. With r here, the
// coefficients run in a launch of their own and the mixing kernels read x once.
//
// x (kX) is [T, K = n·C] bf16, exact as an mma operand; φ comes split into bf16 hi and lo
// side by side (kPhiSplit: [K, 2·mp], row k = hi of φ[k][0..mp) then lo, mp = m rounded up
// to 8 with zero columns: the one-pass split of split.cuh, as the cuBLAS path takes it), so
// that z ≈ x̄·φ_hi + x̄·φ_lo with fp32 accumulation: the cuBLAS path's precision. A chunk of
// 64 k is 64 consecutive rows of it, one contiguous run, read as the mma's B operand by
// transposing ldmatrix. x and φ stream through shared memory by cp.async (proj_stages deep).
// Σx̄² comes from the A fragments the mma's read: each lane sums its columns, then a quad
// sums in a fixed order. Outputs are per split of K (see projection_kernel), summed in split
// order by the coefficient kernels that take them (kSqIn): z and r are bitwise reproducible.
#pragma once

#include "args.h"
#include "platform.h"
#include "projection_wgmma.cuh"
#include "token_math.h"

namespace mhc {

enum class ProjOp { Proj };

constexpr int kProjMaxN = 8;  // m = 80 logits: ten n8 tiles of accumulators a lane

MHC_CX int proj_cols(int n) { return (num_logits(n) + 7) / 8 * 8; }  // mp

#if defined(MHC_CUDA)
constexpr int kProjWarps = 8;
constexpr int kProjThreads = kProjWarps * 32;
constexpr int kProjK = 64;           // k a stage
constexpr int kProjLd = kProjK + 8;  // a 144-byte row: ldmatrix's eight rows hit 32 banks

// MT (the variant's tile): m16 tiles of tokens a warp, so a block of 8 warps takes 128·MT
// tokens. Two halve φ's L2 traffic (each φ fragment serves 32 tokens; n = 8: 10.5 MB of φ
// a block) at the price of registers and one block an SM: the default at n > 4 (see
// generator/profiles.py), an alternative at n = 4 for the autotuner.
template <int MT>
MHC_CX int proj_tokens() {
  return kProjWarps * 16 * MT;
}
// Stages in flight: 4 at n ≤ 4 with one m16 tile a warp (100 KB: 2 blocks an SM), else 3
// (n = 4, two tiles: 132 KB; n = 8: 120 KB and 175 KB).
template <int NB, int MT>
MHC_CX int proj_stages() {
  return NB <= 4 && MT == 1 ? 4 : 3;
}

// A row of φ's split in shared memory: 2·mp bf16 and 16 bytes, so that ldmatrix's eight
// rows (16 bytes each) fall in distinct banks.
template <int NB>
MHC_CX int proj_phi_ld() {
  return 2 * proj_cols(NB) + 8;
}

template <int NB, int MT>
struct ProjShared {
  bf16 x[proj_stages<NB, MT>()][proj_tokens<MT>()][kProjLd];
  bf16 phi[proj_stages<NB, MT>()][kProjK][proj_phi_ld<NB>()];  // rows as stored: [k][hi | lo]
};

// Four 8×8 bf16 matrices from shared memory, lane l giving row l % 8 of matrix l / 8: each
// lane gets its (row l / 4, columns 2·(l % 4) + {0, 1}) pair of every matrix; TRANS: its
// (rows 2·(l % 4) + {0, 1}, column l / 4) pair.
template <bool TRANS = false>
MHC_DEV void ldmatrix_x4(uint32_t (&r)[4], const bf16* p) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
  if constexpr (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

template <int A, int B>
MHC_DEV void zero_tiles(float (&v)[A][B][4]) {
#pragma unroll
  for (int a = 0; a < A; ++a)
#pragma unroll
    for (int b = 0; b < B; ++b)
#pragma unroll
      for (int e = 0; e < 4; ++e) v[a][b][e] = 0.0f;
}

// Block (bx, by): tokens [bx·BM, +BM) over the k chunks of split by (Args::splits splits of
// K, each a run of whole 64-wide chunks): the split's partial z and Σx̄² to [by] of kZOut
// [splits, T, m] and kROut [splits, T].
template <int N, int MT>
__global__ void __launch_bounds__(kProjThreads) projection_kernel(Args a) {
  constexpr int NB = N ? N : kProjMaxN;
  constexpr int S = proj_stages<NB, MT>();
  constexpr int BM = proj_tokens<MT>();
  constexpr int kTiles = proj_cols(NB) / 8;  // n8 tiles, the bound
  extern __shared__ float4 proj_smem[];
  auto& s = *reinterpret_cast<ProjShared<NB, MT>*>(proj_smem);
  const int n = N ? N : a.n;
  const int m = num_logits(n);
  const int mp = proj_cols(n);
  const int tiles = mp / 8;
  const int64_t K = int64_t(n) * a.hidden;
  const int64_t t0 = int64_t(blockIdx.x) * BM;
  const int splits = a.splits > 1 ? a.splits : 1;
  const int total = int(K / kProjK);
  const int per_split = (total + splits - 1) / splits;
  const int first = int(blockIdx.y) * per_split;
  const int chunks = (total - first < per_split ? total - first : per_split);
  const bf16* x = a.in<bf16>(kX);
  const bf16* phi = a.in<bf16>(kPhiSplit);

  // One stage: the block's BM rows of x (rows past T read the last token; never stored),
  // kProjK columns each, and φ's kProjK rows, in 16-byte pieces: a thread's x pieces are
  // the same columns of fixed rows in every stage, so their addresses are set once.
  constexpr int kPieces = kProjK / 8, kRowsAPass = kProjThreads / kPieces;
  constexpr int kXPasses = BM / kRowsAPass;
  constexpr int kPhiPasses = (kProjK * proj_cols(NB) / 4 + kProjThreads - 1) / kProjThreads;
  const int piece = threadIdx.x % kPieces, row0 = threadIdx.x / kPieces;
  const bf16* xsrc[kXPasses];
#pragma unroll
  for (int i = 0; i < kXPasses; ++i) {
    const int64_t tok = t0 + row0 + i * kRowsAPass;
    xsrc[i] = x + (tok < a.tokens ? tok : a.tokens - 1) * K + int64_t(first) * kProjK + piece * 8;
  }
  const bf16* psrc = phi + int64_t(first) * kProjK * 2 * mp;
  const int row_pieces = mp / 4;               // 2·mp bf16 a row: mp / 4 pieces
  const int phi_pieces = kProjK * row_pieces;  // a chunk's rows, one contiguous run
  auto load_stage = [&](int stage, int chunk) {
    const int64_t k0 = int64_t(chunk) * kProjK;
#pragma unroll
    for (int i = 0; i < kXPasses; ++i)
      async_copy16(&s.x[stage][row0 + i * kRowsAPass][piece * 8], xsrc[i] + k0);
#pragma unroll
    for (int i = 0; i < kPhiPasses; ++i) {
      const int e = threadIdx.x + i * kProjThreads;
      if (e < phi_pieces)
        async_copy16(&s.phi[stage][e / row_pieces][(e % row_pieces) * 8],
                     psrc + k0 * 2 * mp + int64_t(e) * 8);
    }
  };

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  // ldmatrix rows: A's four matrices are (rows +0/+8) × (k +0/+8); B's are φ_hi's k +0/+8,
  // then φ_lo's.
  const int frag_row = (lane % 8) + ((lane / 8) % 2) * 8;  // A's row, B's k
  const int a_col = (lane / 16) * 8, b_col = (lane / 16) * mp;
  float acc[MT][kTiles][4];
  zero_tiles(acc);
  float sq[MT][2] = {};

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
    // A chunk's products summed apart, then added: z's fp32 error grows with K / 64 + 64
    // terms instead of K (n·C = 28,672 at n = 4, C = 7168).
    float part[MT][kTiles][4];
    zero_tiles(part);
#pragma unroll
    for (int kk = 0; kk < kProjK; kk += 16) {
      uint32_t af[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        ldmatrix_x4(af[mt], &s.x[st][(warp * MT + mt) * 16 + frag_row][kk + a_col]);
        sq[mt][0] += sq_pair(af[mt][0]) + sq_pair(af[mt][2]);
        sq[mt][1] += sq_pair(af[mt][1]) + sq_pair(af[mt][3]);
      }
#pragma unroll
      for (int j = 0; j < kTiles; ++j) {
        if (j < tiles) {   // decided at compile time where N is
          uint32_t bf[4];  // φ_hi's two k halves, then φ_lo's
          ldmatrix_x4<true>(bf, &s.phi[st][kk + frag_row][j * 8 + b_col]);
          const uint32_t hi[2] = {bf[0], bf[1]}, lo[2] = {bf[2], bf[3]};
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma_bf16(part[mt][j], af[mt], hi);
            mma_bf16(part[mt][j], af[mt], lo);
          }
        }
      }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < kTiles; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][j][e] += part[mt][j][e];
  }
  async_wait<0>();

  const int g = lane / 4, c2 = 2 * (lane % 4);  // the fragments' row and column pair
  const int64_t T = a.tokens;
  float* z = a.out<float>(kZOut) + int64_t(blockIdx.y) * T * m;
  float* r = a.out<float>(kROut) + int64_t(blockIdx.y) * T;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // A quad's four lanes hold a row's columns: sum them in a fixed order.
      float q = sq[mt][h];
      q += shfl_xor(q, 1);
      q += shfl_xor(q, 2);
      const int64_t tok = t0 + (warp * MT + mt) * 16 + g + 8 * h;
      if (tok >= T) continue;
      if (lane % 4 == 0) r[tok] = q;
#pragma unroll
      for (int j = 0; j < kTiles; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = j * 8 + c2 + e;
          if (j < tiles && col < m) z[tok * m + col] = acc[mt][j][2 * h + e];
        }
    }
}
#endif  // MHC_CUDA

// tokens = T, hidden = C, n = n, splits = splits of K (see projection_kernel); partial z
// (kZOut) and Σx̄² (kROut) out. n·C must be a multiple of kProjK and x, φ 16-byte aligned
// (mhc_gen.gpu takes this path only then).
template <typename T, int N, int HIDDEN, int TM, ProjOp OP, bool DYN>
int launch_projection(const Args& a) {
  static_assert(sizeof(T) == 2 && HIDDEN == 0 && DYN, "bf16 x, run-time hidden");
#if defined(MHC_CUDA)
  if (a.n < 1 || a.n > kProjMaxN || (N && a.n != N)) return kBadN;
  // φ's split comes in one of two layouts: [K, 2·mp] for projection_kernel, or K-major
  // [2·mp, K] for the wgmma form (mhc/projection_wgmma.cuh), which only MHC_WGMMA builds have.
  const bool k_major = a.p[kPhiSplitT] != nullptr;
  const void* phi = k_major ? a.p[kPhiSplitT] : a.p[kPhiSplit];
  if (!a.p[kX] || !phi || !a.p[kZOut] || !a.p[kROut]) return kMissingInput;
  const int64_t K = int64_t(a.n) * a.hidden;
  if (K % kProjK != 0 || !aligned_to(a.p[kX], 16) || !aligned_to(phi, 16)) return kBadHidden;
  if (a.tokens == 0) return kOk;
  constexpr int NB = N ? N : kProjMaxN;
  const int splits = a.splits > 1 ? a.splits : 1;
  const int64_t chunks = K / kProjK;
  if ((chunks + splits - 1) / splits * (splits - 1) >= chunks) return kBadHidden;  // empty split
  static_assert(TM == 1 || TM == 2, "the tile is m16 tiles a warp");
  if (k_major) {
#if MHC_WGMMA
    if constexpr (N == 4 || N == 0)
      if (a.n == 4) return launch_projection_wgmma(a, splits);
#endif
    return kUnsupported;  // no wgmma form in this variant, or not n = 4
  }
  const dim3 grid{unsigned((a.tokens + proj_tokens<TM>() - 1) / proj_tokens<TM>()),
                  unsigned(splits)};
  auto* kernel = projection_kernel<N, TM>;
  const size_t smem = sizeof(ProjShared<NB, TM>);
  const error_t err = set_dynamic_smem(kernel, smem);
  if (err != kSuccess) return int(err);
  kernel<<<grid, kProjThreads, smem, static_cast<stream_t>(a.stream)>>>(a);
  return int(last_error());
#else
  return kBadN;  // CUDA only: no variant is built for HIP
#endif
}

}  // namespace mhc
