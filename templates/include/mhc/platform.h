// The one place where CUDA, HIP and a plain host compiler differ.
// Everything else in templates/include is written once against these names.
#pragma once

#include <stdint.h>

#if defined(__HIPCC__)
#define MHC_HIP 1
#include <hip/hip_runtime.h>
#elif defined(__CUDACC__)
#define MHC_CUDA 1
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#else
#define MHC_HOST_ONLY 1
#include <math.h>
#endif

#if defined(MHC_HOST_ONLY)
#define MHC_HD inline
#define MHC_CX constexpr
#else
#define MHC_CX __host__ __device__ constexpr
#define MHC_HD __host__ __device__ __forceinline__
#define MHC_DEV __device__ __forceinline__
#endif

namespace mhc {

// Largest n that any kernel supports: one warp lane per Sinkhorn row/column.
constexpr int kMaxN = 32;

#if defined(MHC_HIP)
constexpr int kWarp = 64;  // wavefront
using stream_t = hipStream_t;
using error_t = hipError_t;
constexpr error_t kSuccess = hipSuccess;
inline error_t last_error() { return hipGetLastError(); }
// Lets a kernel take `bytes` of dynamic shared memory (past 48 KB with its static
// shared memory needs an opt-in).
template <typename K>
inline error_t set_dynamic_smem(K* kernel, size_t bytes) {
  return hipFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                             hipFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}
MHC_DEV float shfl_xor(float v, int o) { return __shfl_xor(v, o); }
// A wavefront runs in lock step; the fences order its shared-memory traffic.
MHC_DEV void sync_warp() {
  __builtin_amdgcn_fence(__ATOMIC_RELEASE, "wavefront");
  __builtin_amdgcn_wave_barrier();
  __builtin_amdgcn_fence(__ATOMIC_ACQUIRE, "wavefront");
}
#elif defined(MHC_CUDA)
constexpr int kWarp = 32;
using stream_t = cudaStream_t;
using error_t = cudaError_t;
constexpr error_t kSuccess = cudaSuccess;
inline error_t last_error() { return cudaGetLastError(); }
// Lets a kernel take `bytes` of dynamic shared memory (past 48 KB with its static
// shared memory needs an opt-in).
template <typename K>
inline error_t set_dynamic_smem(K* kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}
MHC_DEV float shfl_xor(float v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
MHC_DEV void sync_warp() { __syncwarp(); }
// d += a·b for one m16n8k16 tile of bf16 operands (row-major a, column-major b, fp32 d;
// sm_80+: the tensor-core kernels, CUDA only).
MHC_DEV void mma_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// (u, v) ≈ hi + lo as bf16 pairs (u in the low half): hi rounded to nearest even, lo the
// rounding error rounded; one hardware conversion a pair.
MHC_DEV void split_pair(float u, float v, uint32_t& hi, uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(u, v);
  const float2 hf = __bfloat1622float2(h);
  const __nv_bfloat162 l = __floats2bfloat162_rn(u - hf.x, v - hf.y);
  __builtin_memcpy(&hi, &h, 4);
  __builtin_memcpy(&lo, &l, 4);
}
// Σ of the squares of a bf16 pair.
MHC_DEV float sq_pair(uint32_t v) {
  const float lo = __uint_as_float(v << 16), hi = __uint_as_float(v & 0xffff0000u);
  return lo * lo + hi * hi;
}
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define MHC_ASYNC_COPY 1
// 16 bytes from global to shared memory without registers; visible to the block after
// cp_async_wait and a barrier.
MHC_DEV void cp_async16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
}
// 4 bytes (through L1: cp.async's 16-byte form alone may bypass it).
MHC_DEV void cp_async4(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(gmem) : "memory");
}
MHC_DEV void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most PENDING of this thread's committed groups are in flight.
template <int PENDING>
MHC_DEV void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}
#endif
#endif
#ifndef MHC_ASYNC_COPY
#define MHC_ASYNC_COPY 0
#endif
#if !defined(MHC_HOST_ONLY)
// 16 bytes from global to shared memory, asynchronously where the GPU can (visible to the
// copying thread after async_commit and async_wait), else through registers.
MHC_DEV void async_copy16(void* dst, const void* src) {
#if MHC_ASYNC_COPY
  cp_async16(dst, src);
#else
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}

MHC_DEV void async_copy4(float* dst, const float* src) {
#if MHC_ASYNC_COPY
  cp_async4(dst, src);
#else
  *dst = *src;
#endif
}

MHC_DEV void async_commit() {
#if MHC_ASYNC_COPY
  cp_async_commit();
#endif
}

// Waits until at most PENDING of this thread's committed copy groups are in flight.
template <int PENDING>
MHC_DEV void async_wait() {
#if MHC_ASYNC_COPY
  cp_async_wait<PENDING>();
#endif
}

MHC_DEV void stage_wait() { async_wait<0>(); }
#endif

#ifndef MHC_WGMMA  // 1 in variants built for sm_90a too (generator/toolchain.py)
#define MHC_WGMMA 0
#endif
#ifndef MHC_TARGET_SM  // set by each generated variant: its NVIDIA arch, 0 on HIP
#define MHC_TARGET_SM 0
#endif

// Whether a launch may take a vector path: p is null (an absent tensor) or `bytes`-aligned.
inline bool aligned_to(const void* p, int bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % uintptr_t(bytes) == 0;
}

// expf everywhere: on AMD the builtin lowers to the hardware exp, so the
// kernels need no device math library (ROCm 5.2 ships none for gfx942).
#if defined(MHC_HIP)
MHC_HD float fast_exp(float v) { return __builtin_expf(v); }
#else
MHC_HD float fast_exp(float v) { return expf(v); }
#endif

// Element types. bf16 and fp16 are stored as raw 16-bit words so that the
// same code compiles on CUDA, HIP and the host; conversion is explicit.
struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};

MHC_HD float to_float(float v) { return v; }
MHC_HD float to_float(bf16 v) {
  union {
    uint32_t u;
    float f;
  } c;
  c.u = uint32_t(v.bits) << 16;
  return c.f;
}

template <typename T>
MHC_HD T from_float(float v);
template <>
MHC_HD float from_float<float>(float v) {
  return v;
}
template <>
MHC_HD bf16 from_float<bf16>(float v) {
  union {
    uint32_t u;
    float f;
  } c;
  c.f = v;
  bf16 r;
  if ((c.u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN
    r.bits = uint16_t((c.u >> 16) | 0x40u);
  } else {  // round to nearest even
    r.bits = uint16_t((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
  }
  return r;
}

#if !defined(MHC_HOST_ONLY)
#if defined(MHC_HIP)
MHC_HD float to_float(fp16 v) {
  _Float16 h;
  __builtin_memcpy(&h, &v.bits, 2);
  return float(h);
}
template <>
MHC_HD fp16 from_float<fp16>(float v) {
  _Float16 h = _Float16(v);
  fp16 r;
  __builtin_memcpy(&r.bits, &h, 2);
  return r;
}
#else
MHC_HD float to_float(fp16 v) { return __half2float(__ushort_as_half(v.bits)); }
template <>
MHC_HD fp16 from_float<fp16>(float v) {
  fp16 r;
  r.bits = __half_as_ushort(__float2half_rn(v));
  return r;
}
#endif

// VEC consecutive elements moved as one aligned access (16 bytes at most).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
MHC_DEV void load_pack(const T* p, float (&out)[VEC]) {
  Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(pk.v[i]);
}

// load_pack through the read-only path: the compiler may then move the load above
// stores through other pointers (which it must otherwise assume alias it). Only for
// data no thread writes during the kernel.
template <typename T, int VEC>
MHC_DEV Pack<T, VEC> load_raw_ro(const T* p) {
  constexpr int kBytes = int(sizeof(T)) * VEC;
  Pack<T, VEC> pk;
  if constexpr (kBytes == 16) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    __builtin_memcpy(&pk, &u, 16);
  } else if constexpr (kBytes == 8) {
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
    __builtin_memcpy(&pk, &u, 8);
  } else if constexpr (kBytes == 4) {
    const unsigned u = __ldg(reinterpret_cast<const unsigned*>(p));
    __builtin_memcpy(&pk, &u, 4);
  } else {
    const unsigned short u = __ldg(reinterpret_cast<const unsigned short*>(p));
    __builtin_memcpy(&pk, &u, 2);
  }
  return pk;
}

template <typename T, int VEC>
MHC_DEV void load_pack_ro(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pk = load_raw_ro<T, VEC>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(pk.v[i]);
}

// Word w (4 bytes) of a pack of 16- or 32-bit elements, built with register moves.
template <typename T, int VEC>
MHC_DEV uint32_t pack_word(const Pack<T, VEC>& pk, int w) {
  if constexpr (sizeof(T) == 4) {
    uint32_t u;
    __builtin_memcpy(&u, &pk.v[w], 4);
    return u;
  } else {
    return uint32_t(pk.v[2 * w].bits) | (uint32_t(pk.v[2 * w + 1].bits) << 16);
  }
}

// One uint2 or uint4 stored whole: NVVM splits even a plain assignment of one in these
// kernels; __stwb is inline PTX, which it cannot.
template <typename W>
MHC_DEV void store_words(void* p, const W& u) {
#if defined(MHC_CUDA)
  __stwb(reinterpret_cast<W*>(p), u);
#else
  *reinterpret_cast<W*>(p) = u;
#endif
}

// A pack stored as one access of its width. A struct copy (or a memcpy) of 16-bit
// elements is split by the compiler into 2- and 4-byte stores (session 17's ncu: 6.7 of
// 32 bytes a sector used by the ∂x kernel's stores); whole words are not.
template <typename T, int VEC>
MHC_DEV void store_raw(T* p, const Pack<T, VEC>& pk) {
  constexpr int kBytes = int(sizeof(T)) * VEC;
  if constexpr (kBytes == 16) {
    store_words(p,
                make_uint4(pack_word(pk, 0), pack_word(pk, 1), pack_word(pk, 2), pack_word(pk, 3)));
  } else if constexpr (kBytes == 8) {
    store_words(p, make_uint2(pack_word(pk, 0), pack_word(pk, 1)));
  } else if constexpr (kBytes == 4) {
    *reinterpret_cast<uint32_t*>(p) = pack_word(pk, 0);
  } else {
    *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
  }
}

// Two floats as one word of 16-bit T, element 0 in the low half. On CUDA devices one
// cvt.rn.bf16x2.f32 or cvt.rn.f16x2.f32: nearest even as from_float, so the same bits for
// every non-NaN float (a NaN becomes the canonical one), in one instruction where
// from_float's bit trick and NaN branch took ≈ 8 a pair (the ∂x kernel's PTX).
template <typename T>
MHC_DEV uint32_t pair_word(float lo, float hi) {
#if defined(MHC_CUDA) && defined(__CUDA_ARCH__)
  uint32_t u;
  if constexpr (__is_same(T, bf16)) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    __builtin_memcpy(&u, &h, 4);
    return u;
  } else if constexpr (__is_same(T, fp16)) {
    const __half2 h = __floats2half2_rn(lo, hi);
    __builtin_memcpy(&u, &h, 4);
    return u;
  }
#endif
  return uint32_t(from_float<T>(lo).bits) | (uint32_t(from_float<T>(hi).bits) << 16);
}

// WIDE = false: the plain struct copy, which NVVM splits for 16-bit T. At n ≤ 4 it measured
// faster than store_raw in post (H200, session 17: 0.294 against 0.304 ms, with static H 0.302
// against 0.322) and in the static layer (fwd 0.350 against 0.362, fwd+bwd 1.210 against
// 1.247); at n = 8 slower (post 0.477 against 0.300). Why is not known yet. So post_vector
// (post, the layer's forward) and the three-pass layer_bwd_kernel pass wide_stores<NB>().
template <typename T, int VEC, bool WIDE = true>
MHC_DEV void store_pack(T* p, const float (&in)[VEC]) {
  constexpr int kBytes = int(sizeof(T)) * VEC;
  if constexpr (WIDE && sizeof(T) == 2 && kBytes >= 8) {
    uint32_t wd[VEC / 2];
#pragma unroll
    for (int i = 0; i < VEC / 2; ++i) wd[i] = pair_word<T>(in[2 * i], in[2 * i + 1]);
    if constexpr (kBytes == 16)
      store_words(p, make_uint4(wd[0], wd[1], wd[2], wd[3]));
    else
      store_words(p, make_uint2(wd[0], wd[1]));
  } else {
    Pack<T, VEC> pk;
#pragma unroll
    for (int i = 0; i < VEC; ++i) pk.v[i] = from_float<T>(in[i]);
    if constexpr (WIDE)
      store_raw<T, VEC>(p, pk);
    else
      *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
  }
}

// Whether a kernel bounded by NB streams stores its packs by store_raw (store_pack's WIDE).
template <int NB>
MHC_CX bool wide_stores() {
  return NB > 4;
}

MHC_DEV float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += shfl_xor(v, o);
  return v;
}

MHC_DEV float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v = fmaxf(v, shfl_xor(v, o));
  return v;
}
#endif  // !MHC_HOST_ONLY

}  // namespace mhc
