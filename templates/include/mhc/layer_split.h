// How token_kernel's fused layer splits its work over blocks at n ≥ 16 and few tokens:
// grid.y takes groups of x_next's rows (whole quads), grid.z chunks of its columns (at least
// a block's width), so that T·C·n² multiply-adds spread over more blocks than T / TM (H200,
// 32 × 1280 × 32: 8 blocks took 74 µs with the Sinkhorn's 8 of it; 192 blocks, 33 µs).
// Every block still reduces its tokens' Σu² whole and computes each output as before:
// bitwise. __host__ __device__, so that tests/test_layer_split.py checks on the host that
// the groups and chunks cover every row and column once.
#pragma once

#include "platform.h"

namespace mhc {

constexpr int kThreads = 256;          // a block of the token kernels (here: the host shim sees it)
constexpr int kLayerRowsMinN = 16;     // NB (n's bound) from which the layer splits
constexpr int kLayerWantBlocks = 256;  // blocks enough to fill a GPU twice over

// Rows of x_next a group of `groups` takes (whole quads); group g has [g·rows, g·rows + rows).
MHC_CX int layer_group_rows(int n, int groups) { return ((n + groups - 1) / groups + 3) / 4 * 4; }

// Groups of rows (grid.y) for token_blocks blocks of tokens.
MHC_CX int layer_row_groups(int nb, int64_t token_blocks, int n) {
  if (nb < kLayerRowsMinN) return 1;
  const int64_t want = (kLayerWantBlocks + token_blocks - 1) / token_blocks;
  if (want <= 1) return 1;
  const int per = layer_group_rows(n, int(want < n ? want : n));
  return (n + per - 1) / per;
}

// Columns a chunk of `chunks` takes (whole vectors); chunk k has [k·cols, k·cols + cols) ∩ [0, C).
MHC_CX int64_t layer_chunk_cols(int64_t C, int64_t chunks, int vec) {
  return ((C + chunks - 1) / chunks + vec - 1) / vec * vec;
}

// Chunks of columns (grid.z) for `blocks` blocks of tokens and row groups, `width` columns a
// block's pass (threads × vector width).
MHC_CX int layer_column_chunks(int nb, int64_t blocks, int64_t C, int64_t width) {
  if (nb < kLayerRowsMinN || blocks >= kLayerWantBlocks) return 1;
  const int64_t want = (kLayerWantBlocks + blocks - 1) / blocks;
  const int64_t most = (C + width - 1) / width;
  return int(want < most ? want : most);
}

}  // namespace mhc
