// CUDA forward of plr_kernels::causal_stream_attention_fwd, inference only
// (dropout_p must be 0; training uses the Triton kernels): the causal-prefix
// form of stream-isolated attention (plr_kernels/causal_stream_attention.py).
//
// Rows r = n*M + m (stream m of prefix end n), R = N*M per (b, h); with
// scores scaled by `scale`:
//   s_r(j) = scale * q_r . k_prefix[j]   for valid prefix keys j <= n(r),
//   s_r(N + i) = scale * q_r . k_stream[r, i]   for i < S (own stream only),
//   lse_r = log sum exp s_r,   o_r = sum exp(s_r - lse_r) v.
//
// One block per (b, h, RB consecutive rows) -- the streams of consecutive
// positions. The prefix is read in tiles of TN keys that go to shared memory
// once and serve all RB rows, up to the block's last position (the causal cut
// j <= n(r) is a mask on (row, key) inside the tile); the own-stream keys
// follow as tiles whose rows are (row, i) pairs. Online softmax as in
// csrc/cuda/stream_attention.cu:
//   mx' = max(mx, max_j s_j),  alpha = exp(mx - mx'),  p_j = exp(s_j - mx'),
//   l' = alpha l + sum_j p_j,  acc' = alpha acc + sum_j p_j v_j,
// then o = acc / l, lse = mx + log l. Statistics are fp32 (fp64 for fp64
// inputs). The own stream's keys are always valid, so a position with no
// valid prefix key (left padding) still gets a finite output. Each score and
// each output element is computed by one thread in a fixed order:
// deterministic, run to run.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "../stream_attention.h"

#include "attention_tile.cuh"
#include "common.cuh"

namespace plr_kernels {
namespace {

using namespace cuda_common;  // fma_acc, exp_acc, log_acc, neg_inf, serial_dot (cuda/common.cuh)

constexpr int kThreads = 256;
constexpr int64_t kMaxHeadDim = 256;  // D
constexpr int kPer = 4;               // output elements per thread: RB * D <= kPer * kThreads
constexpr int64_t kMaxRows = 16;      // RB



template <typename acc_t>
using Smem = AttentionSmem<acc_t>;  // cuda/attention_tile.cuh

// One online-softmax step over a tile in shared memory, for `rows` query rows.
// Prefix tile (stream_tile false): column j is key n0 + j, visible to row i iff
// valid[j] and n0 + j <= pos[i]. Stream tile: column j of row i is tile row
// i * ncols + j (the row's own stream), always valid.
template <typename acc_t>
__device__ __forceinline__ void softmax_tile(Smem<acc_t>& sm, acc_t (&acc)[kPer], int64_t rows, int64_t D,
                                             int TN, int ncols, bool stream_tile, int64_t n0,
                                             int64_t r_begin, int64_t M) {
  for (int e = threadIdx.x; e < rows * ncols; e += kThreads) {
    const int i = e / ncols, j = e % ncols;
    const int row = stream_tile ? i * ncols + j : j;
    const bool visible = sm.valid[row] && (stream_tile || n0 + j <= (r_begin + i) / M);
    acc_t s = neg_inf<acc_t>();
    if (visible) {
      const acc_t* qi = sm.q + i * D;
      const acc_t* kr = sm.k + row * (D + 1);
      s = serial_dot(qi, kr, D);
    }
    sm.p[i * TN + j] = s;
  }
  __syncthreads();
  softmax_update_rows<kThreads>(sm, acc, rows, D, TN, ncols, stream_tile);  // cuda/attention_tile.cuh
}

// q, o: [B*H, R, D] contiguous; kp, vp: [B*H, N, D]; ks, vs: [B*H, R, S, D].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    causal_stream_attention_fwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ kp,
                                       const scalar_t* __restrict__ vp, const scalar_t* __restrict__ ks,
                                       const scalar_t* __restrict__ vs, const bool* __restrict__ mask,
                                       int64_t H, int64_t M, int64_t N, int64_t S, int64_t D, int64_t RB,
                                       int TN, acc_t scale, scalar_t* __restrict__ o,
                                       acc_t* __restrict__ lse) {
  extern __shared__ unsigned char smem_raw[];
  Smem<acc_t> sm(smem_raw, RB, D, TN);
  const int64_t bh = blockIdx.x;  // b * H + h
  const int64_t b = bh / H;
  const int64_t R = N * M;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * RB;
  const int64_t rows = R - r_begin < RB ? R - r_begin : RB;
  const int64_t n_end = (r_begin + rows - 1) / M + 1;  // keys beyond the last position are cut

  const scalar_t* q_rows = q + (bh * R + r_begin) * D;
  for (int64_t e = threadIdx.x; e < rows * D; e += kThreads) sm.q[e] = scale * static_cast<acc_t>(q_rows[e]);
  for (int64_t i = threadIdx.x; i < rows; i += kThreads) {
    sm.mx[i] = neg_inf<acc_t>();
    sm.l[i] = 0;
  }
  acc_t acc[kPer];
#pragma unroll
  for (int u = 0; u < kPer; ++u) acc[u] = 0;

  const scalar_t* kp_bh = kp + bh * N * D;
  const scalar_t* vp_bh = vp + bh * N * D;
  for (int64_t n0 = 0; n0 < n_end; n0 += TN) {
    const int cols = static_cast<int>(n_end - n0 < TN ? n_end - n0 : TN);
    for (int t = threadIdx.x; t < TN; t += kThreads)
      sm.valid[t] = t < cols && (mask == nullptr || mask[b * N + n0 + t]);
    __syncthreads();
    for (int64_t e = threadIdx.x; e < cols * D; e += kThreads) {
      const int64_t t = e / D, c = e % D;
      const bool ok = sm.valid[t];
      sm.k[t * (D + 1) + c] = ok ? static_cast<acc_t>(kp_bh[(n0 + t) * D + c]) : acc_t(0);
      sm.v[t * D + c] = ok ? static_cast<acc_t>(vp_bh[(n0 + t) * D + c]) : acc_t(0);
    }
    __syncthreads();
    softmax_tile(sm, acc, rows, D, TN, cols, false, n0, r_begin, M);
  }

  // Own streams: tiles of TS = TN / RB steps per row, tile row i * cols + j.
  const int TS = static_cast<int>(TN / RB);
  const scalar_t* ks_rows = ks + (bh * R + r_begin) * S * D;
  const scalar_t* vs_rows = vs + (bh * R + r_begin) * S * D;
  for (int64_t s0 = 0; s0 < S; s0 += TS) {
    const int cols = static_cast<int>(S - s0 < TS ? S - s0 : TS);
    for (int t = threadIdx.x; t < rows * cols; t += kThreads) sm.valid[t] = 1;
    for (int64_t e = threadIdx.x; e < rows * cols * D; e += kThreads) {
      const int64_t t = e / D, c = e % D;
      const int64_t i = t / cols, j = t % cols;
      const int64_t g = (i * S + s0 + j) * D + c;
      sm.k[t * (D + 1) + c] = static_cast<acc_t>(ks_rows[g]);
      sm.v[t * D + c] = static_cast<acc_t>(vs_rows[g]);
    }
    __syncthreads();
    softmax_tile(sm, acc, rows, D, TN, cols, true, 0, r_begin, M);
  }

#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int64_t e = threadIdx.x + static_cast<int64_t>(u) * kThreads;
    if (e < rows * D) {
      const acc_t l = sm.l[e / D];
      o[(bh * R + r_begin) * D + e] = static_cast<scalar_t>(l > 0 ? acc[u] / l : acc_t(0));
    }
  }
  for (int64_t i = threadIdx.x; i < rows; i += kThreads)
    lse[bh * R + r_begin + i] = sm.l[i] > 0 ? sm.mx[i] + log_acc(sm.l[i]) : neg_inf<acc_t>();
}

std::tuple<at::Tensor, at::Tensor> causal_stream_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k_prefix, const at::Tensor& v_prefix,
    const at::Tensor& k_stream, const at::Tensor& v_stream,
    const std::optional<at::Tensor>& prefix_mask, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(dropout_p == 0.0,
              "causal_stream_attention_fwd (CUDA): dropout_p must be 0, the CUDA kernel is inference-only "
              "(use backend='triton' for attention dropout), got dropout_p = ", dropout_p);
  const auto shape = check_causal_stream_attention_inputs("causal_stream_attention_fwd", q, k_prefix,
                                                          v_prefix, k_stream, v_stream, prefix_mask,
                                                          scale, dropout_p, seed);
  const int64_t B = shape.B, H = shape.H, N = shape.N, M = shape.M, S = shape.S, D = shape.D;
  TORCH_CHECK(D >= 1 && D <= kMaxHeadDim, "causal_stream_attention_fwd (CUDA): the head dim D must lie "
              "in [1, ", kMaxHeadDim, "], got D = ", D);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto stat_type = acc_scalar_type(q.scalar_type());
  auto o = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({B, H, N, M}, q.options().dtype(stat_type));
  const int64_t R = N * M;
  if (B * H * R == 0) return {o, lse};
  // Rows per block: as many as kPer accumulators per thread hold (RB * D <= 1024), at most 16.
  const int64_t RB = std::min<int64_t>({kMaxRows, (kPer * kThreads) / D, R});
  const int64_t row_blocks = (R + RB - 1) / RB;
  TORCH_CHECK(B * H <= 0x7fffffff && row_blocks <= 65535, "causal_stream_attention_fwd (CUDA): B * H = ",
              B * H, " must be < 2^31 and N * M / ", RB, " = ", row_blocks, " <= 65535");
  auto qc = q.contiguous(), kpc = k_prefix.contiguous(), vpc = v_prefix.contiguous();
  auto ksc = k_stream.contiguous(), vsc = v_stream.contiguous();
  at::Tensor maskc;
  if (prefix_mask.has_value()) maskc = prefix_mask->contiguous();
  const int64_t max_smem = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "causal_stream_attention_fwd_cuda",
                                  [&] {
    using acc_t = acc_type<scalar_t>;
    // 32 keys per tile (one per lane in the softmax step), 16 when shared
    // memory is short; TN >= RB keeps TS >= 1.
    int TN = 32;
    if (Smem<acc_t>::bytes(RB, D, TN) > max_smem) TN = 16;
    const int64_t smem = Smem<acc_t>::bytes(RB, D, TN);
    TORCH_CHECK(smem <= max_smem, "causal_stream_attention_fwd (CUDA): needs ", smem,
                " bytes of shared memory, the device has ", max_smem, " (D = ", D, ")");
    auto* kernel = causal_stream_attention_fwd_kernel<scalar_t, acc_t>;
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    }
    const dim3 grid(static_cast<unsigned int>(B * H), static_cast<unsigned int>(row_blocks));
    kernel<<<grid, kThreads, smem, stream>>>(
        qc.const_data_ptr<scalar_t>(), kpc.const_data_ptr<scalar_t>(), vpc.const_data_ptr<scalar_t>(),
        ksc.const_data_ptr<scalar_t>(), vsc.const_data_ptr<scalar_t>(),
        maskc.defined() ? maskc.const_data_ptr<bool>() : nullptr, H, M, N, S, D, RB, TN,
        static_cast<acc_t>(scale), o.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {o, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(plr_kernels, CUDA, m) {
  m.impl("causal_stream_attention_fwd", &causal_stream_attention_fwd_cuda);
}

}  // namespace plr_kernels
