// Host build of the fused layer's block split (mhc/layer_split.h), for
// tests/test_layer_split.py: the grid a launch takes and the rows and columns each block owns.
#include "mhc/layer_split.h"

extern "C" {

// groups (grid.y), chunks (grid.z), rows a group and columns a chunk, as the launcher and
// token_kernel compute them.
void shim_layer_split(int nb, long long token_blocks, int n, long long C, int vec, int* groups,
                      int* chunks, int* rows, long long* cols) {
  *groups = mhc::layer_row_groups(nb, token_blocks, n);
  *chunks = mhc::layer_column_chunks(nb, token_blocks * *groups, C, int64_t(mhc::kThreads) * vec);
  *rows = mhc::layer_group_rows(n, *groups);
  *cols = mhc::layer_chunk_cols(C, *chunks, vec);
}
}
