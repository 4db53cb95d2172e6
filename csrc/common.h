// What every CPU kernel of plr_kernels._C shares: the accumulation type, the
// fixed-order dot product and the (row block) x (item chunk) work split.
//
// Accumulation: float for float32 / bfloat16 / float16 inputs, double for
// float64 ones -- the softmax statistics (lse, mu) and scores the ops return
// have that dtype too (plr_kernels/_checks.py: stats_dtype).
//
// Dot products: every score and attention logit of the CPU kernels comes from
// dot_rows() below, whose summation order is fixed by the source (kLanes
// partial sums, lane j taking the terms k = j mod kLanes, combined pairwise in
// one order; no reassociation, and setup.py forbids FMA contraction with
// -ffp-contract=off). Per row the operations and their order do not depend on
// how many rows are scored at once or on the call site, so equal embeddings
// give bit-identical scores (target_rank's ties, topk's order, reruns).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace plr_kernels {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// acc_type as a dtype, for the tensors the kernels return.
inline at::ScalarType acc_scalar_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// ----------------------------------------------------------- fixed-order dot
// (host compilers only: CUDA kernels use cuda/common.cuh)
#if !defined(__CUDACC__)

constexpr int kLanes = 8;  // partial sums per dot product

// 16-byte vectors (SSE2, the x86-64 baseline; NEON on arm64): element-wise
// IEEE arithmetic, so they only make the compiler keep the lanes in registers.
template <typename T>
struct Vec16 {
  typedef T type __attribute__((vector_size(16)));
};

// kLanes values of e as vectors of acc_t. Exact for every dtype (bf16 and fp16
// widen to float exactly), so the way a value is loaded never changes a score.
template <int NV, typename vec, typename scalar_t>
inline void load_lanes(const scalar_t* __restrict__ e, vec* out) {
  using acc_t = std::remove_reference_t<decltype(out[0][0])>;
  constexpr int W = sizeof(vec) / sizeof(acc_t);
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    __builtin_memcpy(out, e, NV * sizeof(vec));
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    // bf16 is the upper half of a float: widen the bits in vector registers.
    typedef uint16_t u16x4 __attribute__((vector_size(8)));
    typedef uint32_t u32x4 __attribute__((vector_size(16)));
    static_assert(W == 4, "bf16 accumulates in float");
    for (int q = 0; q < NV; ++q) {
      u16x4 h;
      __builtin_memcpy(&h, e + q * W, sizeof(h));
      const u32x4 w = __builtin_convertvector(h, u32x4) << 16;
      __builtin_memcpy(&out[q], &w, sizeof(vec));
    }
  } else {
    acc_t tmp[NV * W];
    for (int i = 0; i < NV * W; ++i) tmp[i] = static_cast<acc_t>(e[i]);
    __builtin_memcpy(out, tmp, sizeof(tmp));
  }
}

// out[r] = z_r . e for R rows of z (acc_t, row stride d) and one row e (any
// input dtype, widened exactly). R rows at once give 2R independent
// accumulator chains and load e once.
template <int R, typename acc_t, typename scalar_t>
inline void dot_rows(const acc_t* __restrict__ z, const scalar_t* __restrict__ e, int64_t d,
                     acc_t* __restrict__ out) {
  if constexpr (R == 1 && std::is_same_v<scalar_t, acc_t>) {
    // One row of the accumulation type: the same lanes written as plain loops,
    // which the compiler vectorises at least as well (measured faster for topk
    // at B = 1); the same operations in the same order, so the same bits.
    acc_t lane[kLanes] = {};
    int64_t k = 0;
    for (; k + kLanes <= d; k += kLanes) {
      for (int j = 0; j < kLanes; ++j) lane[j] += z[k + j] * e[k + j];
    }
    for (int j = 0; k < d; ++k, ++j) lane[j] += z[k] * e[k];
    out[0] = ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
    return;
  }
  using vec = typename Vec16<acc_t>::type;
  constexpr int W = 16 / sizeof(acc_t), NV = kLanes / W;
  vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < NV; ++q) acc[r][q] = vec{};
  int64_t k = 0;
  for (; k + kLanes <= d; k += kLanes) {
    vec ek[NV];
    load_lanes<NV>(e + k, ek);
    for (int r = 0; r < R; ++r) {
      for (int q = 0; q < NV; ++q) {
        vec zr;
        __builtin_memcpy(&zr, z + r * d + k + q * W, sizeof(vec));
        acc[r][q] += zr * ek[q];
      }
    }
  }
  acc_t lane[R][kLanes];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < NV; ++q)
      for (int j = 0; j < W; ++j) lane[r][q * W + j] = acc[r][q][j];
  for (int j = 0; k < d; ++k, ++j) {
    const acc_t ek = static_cast<acc_t>(e[k]);
    for (int r = 0; r < R; ++r) lane[r][j] += z[r * d + k] * ek;
  }
  for (int r = 0; r < R; ++r) {
    const acc_t* l = lane[r];
    out[r] = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
  }
}

// z . e over d, the one-row case of dot_rows.
template <typename acc_t, typename scalar_t>
inline acc_t dot(const acc_t* __restrict__ z, const scalar_t* __restrict__ e, int64_t d) {
  acc_t s;
  dot_rows<1>(z, e, d, &s);
  return s;
}

#endif  // !defined(__CUDACC__)

// ------------------------------------------------------------- work split

// Tasks = (block of rows) x (chunk of items), for kernels that stream the item
// table for B rows (target_rank, topk): rows give the parallelism for large
// batches; item chunks keep every thread busy when B is small (serving one
// user). About 4 tasks per thread, chunks of at least min_items items.
struct WorkSplit {
  int64_t row_blocks;  // ceil(B / row_block)
  int64_t chunks;      // item chunks per row block
  int64_t chunk;       // items per chunk (the last one may be shorter)
};

inline WorkSplit split_rows_by_items(int64_t B, int64_t V, int64_t row_block, int64_t min_items,
                                     int64_t threads) {
  const int64_t row_blocks = (B + row_block - 1) / row_block;
  const int64_t max_chunks = std::max<int64_t>(1, V / min_items);
  const int64_t chunks =
      std::min(max_chunks, std::max<int64_t>(1, (4 * threads + row_blocks - 1) / row_blocks));
  return {row_blocks, chunks, (V + chunks - 1) / chunks};
}

}  // namespace plr_kernels
