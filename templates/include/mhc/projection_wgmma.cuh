// The projection at n = 4 on Hopper's warpgroup MMA (wgmma, sm_90a): projection_kernel's job
// (partial z = x̄·φ and Σx̄² for 128 tokens over a split of K) without its per-k16 ldmatrix
// and mma.sync stream. Each of two warpgroups multiplies its 64 tokens' x tile by φ's split,
// [φ_hi | φ_lo] as 48 columns, in four m64n48k16 instructions a 64-wide chunk, reading both
// operands from shared memory. The Σx̄² of the same tile comes from shared memory while they run.
//
// Shared memory: x [stage][128 tokens][64 k] and φ's split K-major [stage][48][64 k]
// (kPhiSplitT [2·mp, K]: row j < mp is φ_hi's column j, row mp + j φ_lo's), each row 128
// bytes with the 128-byte swizzle (16-byte piece c of row r at piece c ^ (r % 8)), every tile
// 1024-byte aligned: the canonical K-major layout a wgmma descriptor names.
//
// Only variants built with MHC_WGMMA (generator/toolchain.py: SASS for sm_90a beside the
// portable compute_90 PTX) have it; the kernel's body is in the sm_90a pass only, and the
// caller (mhc_gen/gpu.py) hands K-major φ only where that SASS runs (an sm_90 device).
#pragma once

#include "args.h"
#include "platform.h"
#include "token_math.h"

namespace mhc {

#if defined(MHC_CUDA) && MHC_WGMMA
constexpr int kWgTokens = 128;  // two warpgroups of 64
constexpr int kWgStages = 4;
constexpr int kWgCols = 48;  // 2·mp at n = 4

struct WgStage {
  bf16 x[kWgTokens][64];
  bf16 phi[kWgCols][64];
};
constexpr size_t kWgSmemBytes = sizeof(WgStage) * kWgStages + 1024;  // + the alignment

// Byte offset of 16-byte piece c of row r in a 128-byte-swizzled tile.
MHC_DEV int swizzled(int r, int c) { return r * 128 + ((c ^ (r % 8)) << 4); }

// A wgmma shared-memory descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart.
MHC_DEV uint64_t wg_desc(const void* tile) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(tile));
  uint64_t d = (addr & 0x3FFFFu) >> 4;
  d |= uint64_t(16 >> 4) << 16;    // leading byte offset: unused with this swizzle
  d |= uint64_t(1024 >> 4) << 32;  // stride byte offset
  d |= uint64_t(1) << 62;          // 128-byte swizzle
  return d;
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)  // the sm_90a pass: wgmma assembles
MHC_DEV void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
MHC_DEV void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
MHC_DEV void wg_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Keeps the compiler from moving accesses of d across the asynchronous MMA's issue and wait.
MHC_DEV void wg_hold(float (&d)[24]) {
#pragma unroll
  for (int i = 0; i < 24; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d (= or +=) A·B for A 64×16 and B 16×48 (bf16, fp32 accumulate), both named by descriptors.
MHC_DEV void wgmma_m64n48k16(float (&d)[24], uint64_t a, uint64_t b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %26, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n48k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "
      "%19, %20, %21, %22, %23}, %24, %25, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23])
      : "l"(a), "l"(b), "r"(accumulate));
}
#endif

// Outputs as projection_kernel's: block (bx, by) writes split by's partial z and Σx̄² of
// tokens [bx·128, +128). A template (N = 4 only), so that every variant may include it.
template <int N>
__global__ void __launch_bounds__(256) projection_wgmma_kernel(Args a) {
  static_assert(N == 4, "48 columns: φ_hi | φ_lo at n = 4");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int m = num_logits(N), mp = kWgCols / 2;
  extern __shared__ float4 wg_smem_raw[];
  auto* stages = reinterpret_cast<WgStage*>((reinterpret_cast<uintptr_t>(wg_smem_raw) + 1023) &
                                            ~uintptr_t(1023));
  const int64_t K = int64_t(N) * a.hidden;
  const int64_t t0 = int64_t(blockIdx.x) * kWgTokens;
  const int splits = a.splits > 1 ? a.splits : 1;
  const int total = int(K / 64);
  const int per_split = (total + splits - 1) / splits;
  const int first = int(blockIdx.y) * per_split;
  const int chunks = total - first < per_split ? total - first : per_split;
  const bf16* x = a.in<bf16>(kX);
  const bf16* phi = a.in<bf16>(kPhiSplitT);  // [2·mp, K]

  // A thread's pieces of a stage: x rows row0 + 32·i (piece `piece`), φ rows the same while
  // < 48. Rows past T read the last token (never stored).
  const int piece = threadIdx.x % 8, row0 = threadIdx.x / 8;
  const bf16* xsrc[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t tok = t0 + row0 + 32 * i;
    xsrc[i] = x + (tok < a.tokens ? tok : a.tokens - 1) * K + int64_t(first) * 64 + piece * 8;
  }
  auto load_stage = [&](int st, int chunk) {
    const int64_t k0 = int64_t(chunk) * 64;
    char* xs = reinterpret_cast<char*>(stages[st].x);
    char* ps = reinterpret_cast<char*>(stages[st].phi);
#pragma unroll
    for (int i = 0; i < 4; ++i) async_copy16(xs + swizzled(row0 + 32 * i, piece), xsrc[i] + k0);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = row0 + 32 * i;
      if (row < kWgCols)
        async_copy16(ps + swizzled(row, piece),
                     phi + row * K + int64_t(first) * 64 + k0 + piece * 8);
    }
  };

  const int wg = threadIdx.x / 128, t = threadIdx.x % 128;
  float acc[24] = {};
  float sq = 0.0f;  // Σx̄² of half of row t / 2 of the warpgroup's 64 (pieces 4·(t % 2) + 0..3)
  const int sq_row = wg * 64 + t / 2;
#pragma unroll
  for (int st = 0; st < kWgStages - 1; ++st) {
    if (st < chunks) load_stage(st, st);
    async_commit();
  }
  for (int chunk = 0; chunk < chunks; ++chunk) {
    async_wait<kWgStages - 2>();
    // This thread's copies are done; make them visible to the MMA's (async-proxy) reads.
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();  // everyone's are; every warpgroup is done with chunk − 1's stage
    const int next = chunk + kWgStages - 1;
    if (next < chunks) load_stage(next % kWgStages, next);
    async_commit();
    const WgStage& s = stages[chunk % kWgStages];
    float part[24];
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)  // k16 steps: 32 bytes along the swizzled rows
      wgmma_m64n48k16(part, wg_desc(reinterpret_cast<const char*>(s.x[wg * 64]) + 32 * kk),
                      wg_desc(reinterpret_cast<const char*>(s.phi[0]) + 32 * kk), kk > 0);
    wg_commit();
    const char* xrow = reinterpret_cast<const char*>(s.x);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint4 v = *reinterpret_cast<const uint4*>(xrow + swizzled(sq_row, 4 * (t % 2) + q));
      sq += sq_pair(v.x) + sq_pair(v.y) + sq_pair(v.z) + sq_pair(v.w);
    }
    wg_wait_all();
    wg_hold(part);
#pragma unroll
    for (int i = 0; i < 24; ++i) acc[i] += part[i];
  }
  async_wait<0>();

  const int64_t T = a.tokens;
  float* z = a.out<float>(kZOut) + int64_t(blockIdx.y) * T * m;
  float* r = a.out<float>(kROut) + int64_t(blockIdx.y) * T;
  sq += shfl_xor(sq, 1);  // the row's two halves, lower half first in both lanes
  if (t % 2 == 0 && t0 + sq_row < T) r[t0 + sq_row] = sq;
  // D's layout: warp w of the warpgroup holds rows 16·w + g and + 8; n8 tile j its columns
  // 8·j + c2 + {0, 1} in d[4·j + {0, 1}] (row g) and d[4·j + {2, 3}] (row g + 8). φ_lo's
  // column k is tile j + mp / 8 of φ_hi's.
  const int warp = t / 32, lane = t % 32, g = lane / 4, c2 = 2 * (lane % 4);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t tok = t0 + wg * 64 + warp * 16 + g + 8 * h;
    if (tok >= T) continue;
#pragma unroll
    for (int j = 0; j < mp / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * j + c2 + e;
        if (col < m) z[tok * m + col] = acc[4 * j + 2 * h + e] + acc[4 * (j + mp / 8) + 2 * h + e];
      }
  }
#endif
}

// The wgmma form's launch (n = 4; the caller has checked the rest as for projection_kernel).
inline int launch_projection_wgmma(const Args& a, int splits) {
  const dim3 grid{unsigned((a.tokens + kWgTokens - 1) / kWgTokens), unsigned(splits)};
  const error_t err = set_dynamic_smem(projection_wgmma_kernel<4>, kWgSmemBytes);
  if (err != kSuccess) return int(err);
  projection_wgmma_kernel<4><<<grid, 256, kWgSmemBytes, static_cast<stream_t>(a.stream)>>>(a);
  return int(last_error());
}
#endif  // MHC_CUDA && MHC_WGMMA

}  // namespace mhc
