// The one argument record every launcher takes. Plain C++ (no CUDA or HIP
// headers), so the pybind11 dispatch module builds with the host compiler.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MHC_ARGS_HD __host__ __device__ inline
#else
#define MHC_ARGS_HD inline
#endif

namespace mhc {

// Tensor pointers, by role. mhc_gen/_args.py lists the same names in the same
// order (tests/test_render.py checks), and Python passes them as one list.
enum Ptr : int {
  // forward inputs
  kX,           // [T, n, C] x, in the variant's dtype
  kY,           // [T, C] sublayer output, same dtype
  kPhi,         // [n·C, m] fp32 projection (dynamic H)
  kPhiSplit,    // [n·C, 2·mp] bf16: φ split into hi and lo side by side, mp = m rounded up
                //   to 8 with zero columns (the tensor-core projection)
  kPhiSplitT,   // [2·mp, n·C] bf16: kPhiSplit transposed (row j < mp is φ_hi's column j,
                //   row mp + j φ_lo's), in its place for the wgmma projection
  kAlpha,       // [3] fp32: pre, post, res scales (dynamic H)
  kBias,        // [m] fp32: b, or the static logits
  kNormWeight,  // [C] fp32: the seed layer's RMSNorm weight
  kHPostIn,     // [T, n] fp32: per-token H_post for post and the dynamic layer
  kHResIn,      // [T, n, n] fp32: per-token H_res for post and the dynamic layer (forward
                //   and backward: else the layer computes H from z and r); [n, n] static
                //   H_res for the static forward ops, with kHPreIn and kHPostIn [n] (else
                //   null: each block computes the static H itself)
  kHPreIn,      // [T, n] fp32: per-token H_pre for the dynamic layer; [n] static H_pre
  // backward inputs
  kGradOut,       // ∂x_next [T, n, C] (post) or ∂u [T, C] (pre), the variant's dtype
  kGradHPreIn,    // [T, n] (or [n] static) fp32 upstream ∂H_pre; may be null
  kGradHPostIn,   // [T, n] fp32 upstream ∂H_post; may be null
  kGradHResIn,    // [T, n, n] fp32 upstream ∂H_res; may be null
  kZIn,           // [T, m] fp32 saved projection z = x̄·φ
  kRIn,           // [T] fp32 saved RMS r; null with kZIn: the kernel computes r from x
  kSqIn,          // [S, T] fp32 Σx̄² of the projection kernel's S splits of n·C (S =
                  //   Args::splits), kZIn then [S, T, m] partial z: the coefficient kernels
                  //   sum them in split order, then write z and r (kZOut, kROut) if given
  kGradLogitsIn,  // [T, m] fp32 ∂z (phi-grad input)
  kGradXIn,       // [T, n, C] ∂x from another path, added to pre's ∂x; may be null
  kPhiT,          // [m, n·C] fp32 φᵀ for pre's backward (coalesced per logit); may be null
  kYF32,          // [T, C] fp32 y for post's backward instead of kY (the seed layer's
                  // y = RMSNorm(u)·w, which its fused forward never rounds); may be null
  // forward outputs
  kOut,    // u [T, C] (pre) or x_next [T, n, C] (post, layer)
  kHPre,   // [T, n] or [n]; may be null
  kHPost,  // [T, n] or [n]; may be null
  kHRes,   // [T, n, n] or [n, n]; may be null
  kZOut,   // [T, m] fp32 z for the backward; may be null
  kROut,   // [T] fp32 r for the backward; may be null
  kUF32,   // [T, C] fp32 u instead of kOut (pre; the seed layer's backward recompute)
  // backward outputs
  kGradX,         // [T, n, C] variant dtype (pre backward: may be null, phases 1-2 only)
  kGradY,         // [T, C] variant dtype
  kGradHPre,      // [T, n] fp32 per token
  kGradHPost,     // [T, n] fp32 per token
  kGradHRes,      // [T, n, n] fp32 per token
  kGradLogits,    // [T, m] fp32 ∂h̃ (or [m] static)
  kGradZ,         // [T, m] fp32 ∂z = α·∂h̃/r (pre backward, for ∂φ); may be null
  kGradAlphaTok,  // [T, 3] fp32 per-token ∂α (pre backward; summed over tokens later); may be null
  kGradPhi,       // [n·C, m] fp32
  kGradNormWeight,  // [splits, C] fp32 per-block partial ∂w of the seed layer's RMSNorm
  kScratch,         // [T, max(iters, 1), 2, n] fp32 Sinkhorn divisors; pre's dynamic
                    // backward then keeps H_pre and ∂r per token there
  kGradXGemm,       // [T, n, C] fp32 ∂z·φᵀ from a GEMM: pre's dynamic backward then runs
                    // only its ∂x epilogue (H_pre and ∂r from kScratch); may be null
  kLayerScale,      // [T, 2] fp32 s = 1/rms(u) and s³·mean(g·w·u) of the dynamic layer's
                    // RMSNorm: out of its backward's sums pass, into its ∂x pass
  kPhiFragments,    // [n·C, 16·⌈m/16⌉] u32: φ's bf16 hi and lo in the tensor-core ∂x
                    // kernels' mma B-fragment order (their launchers write them from kPhi)
  kNumPtrs
};

struct Args {
  const void* p[kNumPtrs];
  int64_t tokens;
  int64_t hidden;
  int n;
  int sinkhorn_iters;
  int splits;  // phi_grad: token chunks, each summed into its own ∂φ slice
  float eps_rms;
  float eps_sk;
  float post_mult;
  void* stream;  // cudaStream_t / hipStream_t

  template <typename T>
  MHC_ARGS_HD const T* in(Ptr k) const {
    return static_cast<const T*>(p[k]);
  }
  template <typename T>
  MHC_ARGS_HD T* out(Ptr k) const {
    return static_cast<T*>(const_cast<void*>(p[k]));
  }
};

// Launchers return 0 on success, a CUDA/HIP error code, or one of these.
enum Status : int {
  kOk = 0,
  kBadHidden = 10001,     // hidden differs from the variant's compiled hidden
  kBadN = 10002,          // n differs from the variant's compiled n, or n > 32
  kMissingInput = 10003,  // a pointer this call needs is null
  kUnsupported = 10004,   // the variant has no kernel for this call (its dtype, n, C or a
                          // pointer's alignment): the caller checks first
};

using Launcher = int (*)(const Args&);

}  // namespace mhc
