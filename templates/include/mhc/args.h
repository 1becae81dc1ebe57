// The one argument record every launcher takes. Plain C++ (no CUDA or HIP
// headers), so the pybind11 dispatch module builds with the host compiler.
#pragma once

#include <stdint.h>

namespace mhc {

struct Args {
  // Inputs. x: [T, n, C] in the variant's dtype; y: [T, C] same dtype.
  const void* x;
  const void* y;
  const float* phi;          // [n·C, m] (dynamic H)
  const float* alpha;        // [3]: pre, post, res (dynamic H)
  const float* bias;         // [m]: b, or the static logits
  const float* norm_weight;  // [C]: the layer's RMSNorm weight
  const float* h_pre_in;     // post with per-token H: [T, n]
  const float* h_post_in;    // [T, n]
  const float* h_res_in;     // [T, n, n]
  // Outputs. out: u [T, C] (pre) or x_next [T, n, C] (post, layer).
  void* out;
  float* h_pre;   // [T, n] or [n] for static; may be null
  float* h_post;  // [T, n] or [n]
  float* h_res;   // [T, n, n] or [n, n]
  // Sizes and parameters.
  int64_t tokens;
  int64_t hidden;
  int n;
  int sinkhorn_iters;
  float eps_rms;
  float eps_sk;
  float post_mult;
  void* stream;  // cudaStream_t / hipStream_t
};

// Launchers return 0 on success, a CUDA/HIP error code, or one of these.
enum Status : int {
  kOk = 0,
  kBadHidden = 10001,  // hidden differs from the variant's compiled hidden
  kBadN = 10002,       // n differs from the variant's compiled n, or n > 32
};

using Launcher = int (*)(const Args&);

}  // namespace mhc
