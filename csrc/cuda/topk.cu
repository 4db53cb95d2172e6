// CUDA kernel of plr_kernels::topk (plr_kernels/topk.py): the k best items of each row
// by score s_b(v) = z_b . e_v, without writing the [B x V] score matrix.
//
// Semantics (plr_kernels/reference.py::topk): entries are ordered by score,
// best first, equal scores by smaller item id (a stable descending sort);
// excluded items (exclude_index and the non-negative ids of exclude_items[b])
// score -inf and are reported with id -1, so a row with fewer than k
// candidates ends in (-inf, -1), after every candidate (-inf ones included).
// Items scoring NaN are no candidates either (marked excluded when scored).
// Scores are fp32 for 16-bit inputs (fp64 for fp64).
//
// Two phases:
//  1. topk_tile_kernel, grid (row blocks, item groups). A block holds R <= 8
//     rows and a buffer of C = 2^p >= 2k (value, id) entries per row in
//     shared memory: [0, k) is the running top-k of the rows, [k, C) receives
//     the scores of the next C - k items. Each warp scores one item at a time
//     for all R rows (lanes stride over d, so the item row is read coalesced;
//     fma in a fixed order + xor butterfly, as in target_rank.cu, so equal
//     embeddings give bit-identical scores). Excluded items are then marked by
//     walking the exclusion lists (O(R L) per chunk, no per-item search), and
//     a bitonic sort of the buffer leaves the top k in [0, k). The group's
//     top-k is written to a workspace [B, G, k] (or straight to the output
//     when G = 1).
//  2. topk_merge_kernel: the same buffer walk over the G*k candidates of each
//     row, then the output.
// Everything is deterministic: fixed arithmetic order and a sorting network.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include "topk.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "common.cuh"

namespace plr_kernels {
namespace {

using namespace cuda_common;  // fma_acc, exp_acc, log_acc, neg_inf, serial_dot (cuda/common.cuh)

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxRows = 8;           // rows of z per block (fewer if shared memory is short)
constexpr int64_t kMaxK = 1024;       // buffer C = max(1024, next_pow2(2k)) <= 2048
constexpr int64_t kMaxD = 1024;       // z rows are staged in shared memory
constexpr int kSentinelId = 0x7fffffff;  // "no entry": after every real item

__device__ __forceinline__ int64_t imin64(int64_t a, int64_t b) { return a < b ? a : b; }

// Buffer ids: id >= 0 a candidate item, ~id (< 0) the excluded item id,
// kSentinelId an empty slot. Ordering ties use the original item id.
__device__ __forceinline__ int real_id(int enc) { return enc < 0 ? ~enc : enc; }

// a before b in the output order: larger score first (buffers hold no NaN:
// NaN scores are stored as excluded), then candidates before excluded items
// and empty slots, then smaller item id (the stable sort of the reference).
template <typename acc_t>
__device__ __forceinline__ bool ranks_before(acc_t va, int ia, acc_t vb, int ib) {
  if (va != vb) return va > vb;
  const bool xa = ia < 0 || ia == kSentinelId, xb = ib < 0 || ib == kSentinelId;
  if (xa != xb) return xb;
  return real_id(ia) < real_id(ib);
}



// Sorts `rows` buffers of C entries (C a power of two) in output order with
// a bitonic network; all rows at once, every thread of the block takes part.
template <typename acc_t>
__device__ void bitonic_sort_rows(acc_t* val, int* id, int rows, int C) {
  const int half = C >> 1;
  for (int size = 2; size <= C; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < rows * half; i += kThreads) {
        const int r = i / half, j = i % half;
        const int lo = 2 * stride * (j / stride) + (j % stride), hi = lo + stride;
        // Ascending in "ranks_before" order inside blocks with (lo & size) == 0.
        const bool forward = (lo & size) == 0;
        acc_t* v = val + static_cast<int64_t>(r) * C;
        int* d = id + static_cast<int64_t>(r) * C;
        const bool hi_first = ranks_before(v[hi], d[hi], v[lo], d[lo]);
        if (hi_first == forward) {
          const acc_t tv = v[lo]; v[lo] = v[hi]; v[hi] = tv;
          const int ti = d[lo]; d[lo] = d[hi]; d[hi] = ti;
        }
      }
      __syncthreads();
    }
  }
}

// Writes slots [0, k) of each row. final: the output, where excluded items and
// empty slots get id -1; else the workspace of the merge, which keeps the
// encoded ids (an excluded item still orders by its own id).
template <typename acc_t>
__device__ void write_rows(const acc_t* val, const int* id, int rows, int C, int64_t k,
                           acc_t* out_val, int64_t* out_id, int64_t row_stride, bool final) {
  for (int64_t i = threadIdx.x; i < rows * k; i += kThreads) {
    const int64_t r = i / k, j = i % k;
    const int enc = id[r * C + j];
    out_val[r * row_stride + j] = val[r * C + j];
    out_id[r * row_stride + j] = !final ? enc : (enc < 0 || enc == kSentinelId) ? -1 : enc;
  }
}

template <typename acc_t>
__device__ void fill_sentinels(acc_t* val, int* id, int rows, int C, int from) {
  for (int i = threadIdx.x; i < rows * C; i += kThreads) {
    if (i % C >= from) { val[i] = neg_inf<acc_t>(); id[i] = kSentinelId; }
  }
}

// Phase 1. Shared memory: z rows [R, d] (acc_t), then val [R, C], id [R, C].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    topk_tile_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ E, int64_t B,
                     int64_t V, int64_t d, int64_t k, int C, int R, int64_t chunks_per_group,
                     int64_t exclude_index, const int64_t* __restrict__ ex, int64_t L,
                     acc_t* __restrict__ out_val, int64_t* __restrict__ out_id,
                     int64_t out_row_stride, bool final) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* z_s = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* val = z_s + static_cast<int64_t>(R) * d;
  int* id = reinterpret_cast<int*>(val + static_cast<int64_t>(R) * C);

  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * R;
  const int rows = static_cast<int>(imin64(R, B - row0));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t span = C - k;  // items scored per chunk
  const int64_t n_chunks = (V + span - 1) / span;
  const int64_t c_begin = blockIdx.y * chunks_per_group;
  const int64_t c_end = imin64(n_chunks, c_begin + chunks_per_group);

  for (int64_t i = threadIdx.x; i < R * d; i += kThreads) {
    const int64_t r = i / d;
    z_s[i] = r < rows ? static_cast<acc_t>(z[(row0 + r) * d + i % d]) : acc_t(0);
  }
  fill_sentinels(val, id, R, C, 0);
  __syncthreads();

  for (int64_t c = c_begin; c < c_end; ++c) {
    const int64_t v0 = c * span;
    // Scores of items v0 .. v0 + span - 1 into slots k .. C - 1.
    for (int64_t i = warp; i < span; i += kWarps) {
      const int64_t v = v0 + i;
      acc_t acc[kMaxRows];
#pragma unroll
      for (int r = 0; r < kMaxRows; ++r) acc[r] = 0;
      if (v < V) {
        const scalar_t* e = E + v * d;
        for (int64_t j = lane; j < d; j += 32) {
          const acc_t ej = static_cast<acc_t>(e[j]);
#pragma unroll
          for (int r = 0; r < kMaxRows; ++r)
            if (r < rows) acc[r] = fma_acc(z_s[r * d + j], ej, acc[r]);
        }
#pragma unroll
        for (int r = 0; r < kMaxRows; ++r)
          if (r < rows)  // block-uniform
#pragma unroll
            for (int off = 16; off > 0; off >>= 1)
              acc[r] = acc[r] + __shfl_xor_sync(0xffffffffu, acc[r], off);
      }
      if (lane < R) {
        acc_t s = acc[0];
#pragma unroll
        for (int r = 1; r < kMaxRows; ++r)
          if (r == lane) s = acc[r];
        const bool nan = s != s;  // no candidate: stored as an excluded item
        val[lane * C + k + i] = v < V && !nan ? s : neg_inf<acc_t>();
        id[lane * C + k + i] = v >= V ? kSentinelId : nan ? ~static_cast<int>(v) : static_cast<int>(v);
      }
    }
    __syncthreads();
    // Exclusions falling in this chunk. Several threads may mark the same
    // slot (repeated ids), always with the same values.
    if (exclude_index >= v0 && exclude_index < imin64(V, v0 + span)) {
      for (int r = threadIdx.x; r < rows; r += kThreads) {
        val[r * C + k + (exclude_index - v0)] = neg_inf<acc_t>();
        id[r * C + k + (exclude_index - v0)] = ~static_cast<int>(exclude_index);
      }
    }
    for (int64_t i = threadIdx.x; i < rows * L; i += kThreads) {
      const int64_t r = i / L;
      const int64_t u = ex[(row0 + r) * L + i % L];
      if (u >= v0 && u < v0 + span && u < V) {
        val[r * C + k + (u - v0)] = neg_inf<acc_t>();
        id[r * C + k + (u - v0)] = ~static_cast<int>(u);
      }
    }
    __syncthreads();
    bitonic_sort_rows(val, id, R, C);
  }
  write_rows(val, id, rows, C, k, out_val + row0 * out_row_stride + blockIdx.y * k,
             out_id + row0 * out_row_stride + blockIdx.y * k, out_row_stride, final);
}

// Phase 2: merges the G sorted top-k lists of each row (ws [B, G*k]).
// Shared memory: val [R, C], id [R, C].
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    topk_merge_kernel(const acc_t* __restrict__ ws_val, const int64_t* __restrict__ ws_id, int64_t B, int64_t n_cand, int64_t k, int C,
                      int R, acc_t* __restrict__ out_val, int64_t* __restrict__ out_id) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* val = reinterpret_cast<acc_t*>(smem_raw);
  int* id = reinterpret_cast<int*>(val + static_cast<int64_t>(R) * C);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * R;
  const int rows = static_cast<int>(imin64(R, B - row0));
  const int64_t span = C - k;
  fill_sentinels(val, id, R, C, 0);
  __syncthreads();
  for (int64_t c0 = 0; c0 < n_cand; c0 += span) {
    for (int64_t i = threadIdx.x; i < R * span; i += kThreads) {
      const int64_t r = i / span, j = c0 + i % span;
      const int64_t slot = r * C + k + i % span;
      if (r < rows && j < n_cand) {
        val[slot] = ws_val[(row0 + r) * n_cand + j];
        id[slot] = static_cast<int>(ws_id[(row0 + r) * n_cand + j]);
      } else {
        val[slot] = neg_inf<acc_t>();
        id[slot] = kSentinelId;
      }
    }
    __syncthreads();
    bitonic_sort_rows(val, id, R, C);
  }
  write_rows(val, id, rows, C, k, out_val + row0 * k, out_id + row0 * k, k, true);
}

// The CUDA kernel's own limits, beyond the checks shared with the CPU kernel.
void check_topk_cuda_limits(const at::Tensor& z, const at::Tensor& item_emb, int64_t k) {
  TORCH_CHECK(z.is_cuda(), "topk (CUDA): z and item_emb must be CUDA tensors, got ", z.device());
  const int64_t V = item_emb.size(0), d = z.size(1);
  TORCH_CHECK(V < kSentinelId, "topk (CUDA): item_emb must have V < 2^31 - 1 rows, got V = ", V);
  TORCH_CHECK(d <= kMaxD, "topk (CUDA): d must be <= ", kMaxD,
              " (z rows are staged in shared memory), got d = ", d);
  TORCH_CHECK(k <= kMaxK, "topk (CUDA): k must be <= ", kMaxK,
              " (the running top-k lives in shared memory), got k = ", k,
              "; use backend='torch' for larger k");
}

// Rows per block: the most (<= kMaxRows) whose shared memory fits the device.
int rows_per_block(int64_t bytes_per_row, int64_t max_bytes) {
  int R = kMaxRows;
  while (R > 1 && R * bytes_per_row > max_bytes) R >>= 1;
  TORCH_CHECK(R * bytes_per_row <= max_bytes, "topk (CUDA): needs ", bytes_per_row,
              " bytes of shared memory per block, the device has ", max_bytes);
  return R;
}

template <typename K>
void allow_shared_memory(K kernel, int64_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

std::tuple<at::Tensor, at::Tensor> topk_cuda(const at::Tensor& z, const at::Tensor& item_emb,
                                             int64_t k, int64_t exclude_index,
                                             const std::optional<at::Tensor>& exclude_items) {
  check_topk_inputs(z, item_emb, k, exclude_index, exclude_items);
  check_topk_cuda_limits(z, item_emb, k);
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t B = z.size(0), V = item_emb.size(0), d = z.size(1);
  const auto stat_type = acc_scalar_type(z.scalar_type());
  auto values = at::empty({B, k}, z.options().dtype(stat_type));
  auto ids = at::empty({B, k}, z.options().dtype(at::kLong));
  if (B == 0) return {values, ids};
  auto zc = z.contiguous();
  auto ec = item_emb.contiguous();
  at::Tensor exc;
  int64_t L = 0;
  if (exclude_items.has_value() && exclude_items->size(1) > 0) {
    exc = exclude_items->contiguous();
    L = exc.size(1);
  }
  // Buffer of C = 2^p >= 2k slots per row, at least 1024: a chunk scores C - k items.
  int C = 1024;
  while (C < 2 * k) C <<= 1;
  const int64_t span = C - k;
  const int64_t n_chunks = (V + span - 1) / span;

  const auto* props = at::cuda::getCurrentDeviceProperties();
  const int64_t max_smem = props->sharedMemPerBlockOptin;
  auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "topk_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const int64_t slot_bytes = C * static_cast<int64_t>(sizeof(acc_t) + sizeof(int));
    const int R = static_cast<int>(std::min<int64_t>(
        B, rows_per_block(d * static_cast<int64_t>(sizeof(acc_t)) + slot_bytes, max_smem)));
    const int64_t row_blocks = (B + R - 1) / R;
    TORCH_CHECK(row_blocks <= 0x7fffffff, "topk (CUDA): B too large, got ", B);
    // Item groups: enough blocks to fill the device twice over.
    const int64_t target_blocks = 2LL * props->multiProcessorCount;
    int64_t G = std::min<int64_t>(n_chunks, std::max<int64_t>(1, (target_blocks + row_blocks - 1) / row_blocks));
    G = std::min<int64_t>(G, 65535);
    const int64_t per_group = (n_chunks + G - 1) / G;
    G = (n_chunks + per_group - 1) / per_group;

    const int64_t tile_smem = R * (d * static_cast<int64_t>(sizeof(acc_t)) + slot_bytes);
    auto* tile = topk_tile_kernel<scalar_t, acc_t>;
    allow_shared_memory(tile, tile_smem);
    const dim3 grid(static_cast<unsigned int>(row_blocks), static_cast<unsigned int>(G));
    const int64_t* ex_ptr = L > 0 ? exc.const_data_ptr<int64_t>() : nullptr;
    if (G == 1) {
      tile<<<grid, kThreads, tile_smem, stream>>>(
          zc.const_data_ptr<scalar_t>(), ec.const_data_ptr<scalar_t>(), B, V, d, k, C, R,
          per_group, exclude_index, ex_ptr, L, values.mutable_data_ptr<acc_t>(),
          ids.mutable_data_ptr<int64_t>(), k, true);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    auto ws_val = at::empty({B, G * k}, values.options());
    auto ws_id = at::empty({B, G * k}, ids.options());
    tile<<<grid, kThreads, tile_smem, stream>>>(
        zc.const_data_ptr<scalar_t>(), ec.const_data_ptr<scalar_t>(), B, V, d, k, C, R,
        per_group, exclude_index, ex_ptr, L, ws_val.mutable_data_ptr<acc_t>(),
        ws_id.mutable_data_ptr<int64_t>(), G * k, false);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int Rm = static_cast<int>(std::min<int64_t>(B, rows_per_block(slot_bytes, max_smem)));
    const int64_t merge_smem = Rm * slot_bytes;
    auto* merge = topk_merge_kernel<acc_t>;
    allow_shared_memory(merge, merge_smem);
    merge<<<static_cast<unsigned int>((B + Rm - 1) / Rm), kThreads, merge_smem, stream>>>(
        ws_val.const_data_ptr<acc_t>(), ws_id.const_data_ptr<int64_t>(), B, G * k, k, C, Rm,
        values.mutable_data_ptr<acc_t>(), ids.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {values, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(plr_kernels, CUDA, m) { m.impl("topk", &topk_cuda); }

}  // namespace plr_kernels
