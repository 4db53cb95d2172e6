// What every CUDA kernel of plr_kernels._C shares: the accumulation type
// (csrc/common.h: float, double for double inputs), exact fma / exp / log per
// accumulation type, -inf, and the fixed-order dot product.
#pragma once

#include <cstdint>
#include <limits>

#include "../common.h"

namespace plr_kernels {
namespace cuda_common {

__device__ __forceinline__ float fma_acc(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return __fma_rn(a, b, c); }
__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() { return -std::numeric_limits<acc_t>::infinity(); }

// a . b over D by one thread: explicit fma in index order (no contraction
// choices left to the compiler), so every kernel gets the same logit.
template <typename acc_t>
__device__ __forceinline__ acc_t serial_dot(const acc_t* a, const acc_t* b, int64_t D) {
  acc_t s = 0;
  for (int64_t c = 0; c < D; ++c) s = fma_acc(a[c], b[c], s);
  return s;
}

}  // namespace cuda_common
}  // namespace plr_kernels
