// What the CUDA forward kernels of both attention forms
// (csrc/cuda/stream_attention.cu, csrc/cuda/causal_stream_attention.cu) share:
// the shared-memory layout of a block and the online-softmax update over a
// tile in it (PLR Eq. 4, the FlashAttention recurrence), once the tile's
// scores are in place:
//   mx' = max(mx, max_j s_j),  alpha = exp(mx - mx'),  p_j = exp(s_j - mx'),
//   l' = alpha l + sum_j p_j,  acc' = alpha acc + sum_j p_j v_j.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace plr_kernels {
namespace cuda_common {

// Shared memory of one block: the tile of `rows` query rows (acc_t arrays,
// then the int key flags). TN keys per tile.
template <typename acc_t>
struct AttentionSmem {
  acc_t* q;      // [rows, D]   scale * q
  acc_t* k;      // [TN, D + 1] (padded: conflict-free column reads)
  acc_t* v;      // [TN, D]
  acc_t* p;      // [rows, TN]  scores, then probabilities of the tile
  acc_t* mx;     // [rows] running max
  acc_t* l;      // [rows] running sum
  acc_t* alpha;  // [rows] rescale factor of the current tile
  int* valid;    // [TN] row of the tile is a valid key

  __device__ AttentionSmem(unsigned char* raw, int64_t rows, int64_t D, int TN) {
    q = reinterpret_cast<acc_t*>(raw);
    k = q + rows * D;
    v = k + TN * (D + 1);
    p = v + TN * D;
    mx = p + rows * TN;
    l = mx + rows;
    alpha = l + rows;
    valid = reinterpret_cast<int*>(alpha + rows);
  }
  static int64_t bytes(int64_t rows, int64_t D, int TN) {
    return (rows * D + TN * (D + 1) + TN * D + rows * TN + 3 * rows) * static_cast<int64_t>(sizeof(acc_t)) +
           TN * static_cast<int64_t>(sizeof(int));
  }
};

// Steps 2-3 of one online-softmax step for `rows` query rows, after step 1 has
// written the scores (-inf where a key is not visible) to sm.p [rows, TN] and
// synchronised. 2: running max / sum, one warp per row, lane j = column j
// (ncols <= 32). 3: acc = alpha acc + sum_j p_j v, the thread owning output
// elements e = tid + u * THREADS of [rows, D]; column j of row i reads value
// row `stream_tile ? i * ncols + j : j`.
template <int THREADS, int PER, typename acc_t>
__device__ __forceinline__ void softmax_update_rows(AttentionSmem<acc_t>& sm, acc_t (&acc)[PER], int64_t rows, int64_t D,
                                                    int TN, int ncols, bool stream_tile) {
  constexpr int kWarps = THREADS / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = warp; i < rows; i += kWarps) {
    const acc_t s = lane < ncols ? sm.p[i * TN + lane] : neg_inf<acc_t>();
    acc_t tile_max = s;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
      tile_max = fmax(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, off));
    const acc_t mx_old = sm.mx[i];
    const acc_t mx_new = fmax(mx_old, tile_max);
    // exp(-inf - finite) = 0; an all -inf row so far keeps p = 0, alpha = 0 (never inf - inf).
    const acc_t pj = s == neg_inf<acc_t>() ? acc_t(0) : exp_acc(s - mx_new);
    acc_t sum = pj;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum = sum + __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane < ncols) sm.p[i * TN + lane] = pj;
    __syncwarp();
    if (lane == 0) {
      const acc_t alpha = mx_old == neg_inf<acc_t>() ? acc_t(0) : exp_acc(mx_old - mx_new);
      sm.alpha[i] = alpha;
      sm.l[i] = sm.l[i] * alpha + sum;
      sm.mx[i] = mx_new;
    }
  }
  __syncthreads();
#pragma unroll
  for (int u = 0; u < PER; ++u) {
    const int64_t e = threadIdx.x + static_cast<int64_t>(u) * THREADS;
    if (e < rows * D) {
      const int64_t i = e / D, c = e % D;
      acc_t a = acc[u] * sm.alpha[i];
      for (int j = 0; j < ncols; ++j) {
        const int row = stream_tile ? static_cast<int>(i) * ncols + j : j;
        a = fma_acc(sm.p[i * TN + j], sm.v[row * D + c], a);
      }
      acc[u] = a;
    }
  }
  __syncthreads();  // the next tile overwrites k, v, p
}

}  // namespace cuda_common
}  // namespace plr_kernels
