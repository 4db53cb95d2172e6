// CUDA kernel of plr_kernels::target_rank; semantics in ../target_rank.cpp.
//
// One block per row b. Each warp scores one item at a time (lanes stride over
// d, so the item row is read coalesced), the target's score included, with the
// same warp_dot(): explicit fma in a fixed order and an xor-butterfly whose
// result is identical in every lane (a+b == b+a exactly). Items equal to the
// target therefore tie bit for bit. Counts are reduced over the block; the
// excluded items are then scored again by warp 0 and subtracted, so the
// streaming loop has no per-item id tests. Offsets are int64 throughout.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include <type_traits>

#include "../target_rank.h"

#include "common.cuh"

namespace plr_kernels {
namespace {

using namespace cuda_common;  // fma_acc, exp_acc, log_acc, neg_inf, serial_dot (cuda/common.cuh)

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;


template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t warp_dot(const scalar_t* __restrict__ z,
                                          const scalar_t* __restrict__ e, int64_t d, int lane) {
  acc_t acc = 0;
  for (int64_t k = lane; k < d; k += 32) {
    acc = fma_acc(static_cast<acc_t>(z[k]), static_cast<acc_t>(e[k]), acc);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc = acc + __shfl_xor_sync(0xffffffffu, acc, off);
  return acc;
}

// A NaN candidate beats nothing; a NaN target is beaten by everything (it
// ranks last), as in ../target_rank.cpp.
template <typename acc_t>
__device__ __forceinline__ bool beats(acc_t s, acc_t t, bool pessimistic) {
  return (pessimistic ? s >= t : s > t) || t != t;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    target_rank_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ E,
                       const int64_t* __restrict__ target, int64_t exclude_index,
                       const int64_t* __restrict__ ex, int64_t L, bool pessimistic, int64_t V,
                       int64_t d, int64_t* __restrict__ out) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t t_shared;
  __shared__ long long warp_count[kWarps];

  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const scalar_t* zb = z + b * d;
  const int64_t tgt = target[b];

  if (warp == 0) {
    const acc_t t = warp_dot<acc_t>(zb, E + tgt * d, d, lane);
    if (lane == 0) t_shared = t;
  }
  __syncthreads();
  const acc_t t = t_shared;

  // Every item, the target included (it counts only when pessimistic).
  long long count = 0;
  for (int64_t v = warp; v < V; v += kWarps) {
    count += beats(warp_dot<acc_t>(zb, E + v * d, d, lane), t, pessimistic);
  }
  if (lane == 0) warp_count[warp] = count;
  __syncthreads();

  if (warp == 0) {
    long long c = lane < kWarps ? warp_count[lane] : 0;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) c += __shfl_xor_sync(0xffffffffu, c, off);
    c -= beats(t, t, pessimistic);  // the target met itself (a NaN target counts itself)
    // Distinct non-candidates other than the target, each subtracted once if
    // it was counted. Branches depend only on ids, so they are warp-uniform.
    if (exclude_index >= 0 && exclude_index < V && exclude_index != tgt) {
      c -= beats(warp_dot<acc_t>(zb, E + exclude_index * d, d, lane), t, pessimistic);
    }
    const int64_t* exb = ex + b * L;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t u = exb[l];
      if (u < 0 || u == tgt || u == exclude_index) continue;
      bool seen = false;
      for (int64_t j = 0; j < l && !seen; ++j) seen = exb[j] == u;
      if (seen) continue;
      c -= beats(warp_dot<acc_t>(zb, E + u * d, d, lane), t, pessimistic);
    }
    if (lane == 0) out[b] = 1 + c;
  }
}

at::Tensor target_rank_cuda(const at::Tensor& z, const at::Tensor& item_emb,
                            const at::Tensor& target, int64_t exclude_index,
                            const std::optional<at::Tensor>& exclude_items, bool pessimistic) {
  check_target_rank_inputs(z, item_emb, target, exclude_index, exclude_items);
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t B = z.size(0), V = item_emb.size(0), d = z.size(1);
  auto out = at::empty({B}, target.options());
  if (B == 0) return out;
  TORCH_CHECK(B <= 0x7fffffff, "target_rank: B must be < 2^31 on CUDA, got ", B);
  auto zc = z.contiguous();
  auto ec = item_emb.contiguous();
  auto tc = target.contiguous();
  at::Tensor exc;
  int64_t L = 0;
  if (exclude_items.has_value()) {
    exc = exclude_items->contiguous();
    L = exc.size(1);
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "target_rank_cuda", [&] {
    target_rank_kernel<scalar_t><<<static_cast<unsigned int>(B), kThreads, 0, stream>>>(
        zc.const_data_ptr<scalar_t>(), ec.const_data_ptr<scalar_t>(),
        tc.const_data_ptr<int64_t>(), exclude_index,
        L > 0 ? exc.const_data_ptr<int64_t>() : nullptr, L, pessimistic, V, d,
        out.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(plr_kernels, CUDA, m) { m.impl("target_rank", &target_rank_cuda); }

}  // namespace plr_kernels
