// The bf16 split of an fp32 matrix for the split-precision GEMMs of dynamic H
// (v ≈ hi + lo: hi = v rounded to bf16, lo = v − hi rounded), in one pass.
//
// v is [rows, cols] fp32 (kPhi); out (kOut) is [rows, parts·cols] bf16: row r holds
// `parts` copies of the row's split side by side, part p the lo half where bit p of
// the mask (Args::splits) is set, else the hi half. A split along v's rows, [parts·R, C],
// is the same call with one row of R·C columns. Torch's two passes and copy (hi = v,
// lo = v − hi, then any second hi) read v twice and the hi part up to twice: 14–18 bytes
// an element against 8–10 here, and φ is 570 MB at n = 32, C = 4096.
#pragma once

#include "args.h"
#include "platform.h"

namespace mhc {

enum class SplitOp { Split };

// Four consecutive elements of one row a thread where cols is a multiple of 4 (VEC = 4,
// 16-byte loads, 8-byte stores), else one; a grid-stride loop over the elements.
template <int VEC>
__global__ void __launch_bounds__(256)
    split_bf16_kernel(const float* __restrict__ v, bf16* __restrict__ out, int64_t cols,
                      int64_t groups, int parts, unsigned lo_mask) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const int64_t e = g * VEC, r = e / cols, c = e - r * cols;
    float hi[VEC], lo[VEC];
    load_pack_ro<float, VEC>(v + e, hi);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float h = to_float(from_float<bf16>(hi[i]));
      lo[i] = hi[i] - h;  // as torch.sub(v, hi): fp32, rounded on the store
      hi[i] = h;
    }
    bf16* row = out + r * parts * cols + c;
    for (int p = 0; p < parts; ++p) {
      if ((lo_mask >> p) & 1u)
        store_pack<bf16, VEC>(row + p * cols, lo);
      else
        store_pack<bf16, VEC>(row + p * cols, hi);
    }
  }
}

// tokens = rows, hidden = cols, n = parts (1–8), splits = the lo mask.
template <typename T, int N, int HIDDEN, int TM, SplitOp OP, bool DYN>
int launch_split(const Args& a) {
  static_assert(sizeof(T) == 4 && N == 0 && HIDDEN == 0, "one variant: fp32 in, run-time shape");
  if (a.n < 1 || a.n > 8) return kBadN;
  if (!a.p[kPhi] || !a.p[kOut]) return kMissingInput;
  const int64_t total = a.tokens * a.hidden;
  if (total == 0) return kOk;
  const stream_t stream = static_cast<stream_t>(a.stream);
  const float* v = a.in<float>(kPhi);
  bf16* out = a.out<bf16>(kOut);
  const unsigned mask = unsigned(a.splits);
  const bool vec = a.hidden % 4 == 0 && aligned_to(v, 16) && aligned_to(out, 8);
  const int64_t groups = vec ? total / 4 : total;
  // Enough blocks to fill any GPU several times over; the loop covers the rest.
  const int64_t want = (groups + 255) / 256;
  const unsigned blocks = unsigned(want < 8192 ? want : 8192);
  if (vec)
    split_bf16_kernel<4><<<blocks, 256, 0, stream>>>(v, out, a.hidden, groups, a.n, mask);
  else
    split_bf16_kernel<1><<<blocks, 256, 0, stream>>>(v, out, a.hidden, groups, a.n, mask);
  return int(last_error());
}

}  // namespace mhc
