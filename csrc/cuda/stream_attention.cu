// CUDA forward of plr_kernels::stream_attention_fwd (PLR Eq. 4-5),
// inference only (dropout_p must be 0; training uses the Triton kernels).
//
// For user b, head h and stream m, with scores scaled by `scale`:
//   s_m(n) = scale * q_m . k_prefix[n]   for the valid prefix keys n < N,
//   s_m(N + j) = scale * q_m . k_stream[m, j]   for j < S (own stream only),
//   lse_m = log sum exp s_m,   o_m = sum exp(s_m - lse_m) v.
//
// One block per (b, h) holds all M <= 16 stream queries. The prefix is read
// in tiles of TN rows that go to shared memory ONCE and serve all M queries
// (the point of the fused kernel: the prefix is never expanded M times). The stream
// keys follow as tiles whose rows are (m, j) pairs, each query scoring only
// its own stream's rows. Every tile goes through the same online softmax
// (FlashAttention): with the running max mx, sum l and output acc,
//   mx' = max(mx, max_j s_j),  alpha = exp(mx - mx'),  p_j = exp(s_j - mx'),
//   l' = alpha l + sum_j p_j,  acc' = alpha acc + sum_j p_j v_j,
// and at the end o = acc / l, lse = mx + log l. Statistics are fp32 (fp64 for
// fp64 inputs). The own stream's keys are always valid (S >= 1), so a fully
// padded prefix still gives a finite output; padded rows enter as p = 0 with
// zeroed values, so junk behind the mask cannot leak in as NaN. Each score
// and each output element is computed by one thread in a fixed order: the
// result is deterministic, run to run.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

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
constexpr int64_t kMaxStreams = 16;  // M
constexpr int64_t kMaxHeadDim = 256;  // D
// Output elements (m, c) held in registers per thread: M * D <= PER * kThreads.
// Two instantiations keep the register count (and so the occupancy) low for
// the common M * D <= 1024 (PLR: M <= 8 streams, D = 128).
constexpr int kPerThreadSmall = 4;
constexpr int kPerThreadLarge = static_cast<int>(kMaxStreams * kMaxHeadDim / kThreads);



template <typename acc_t>
using Smem = AttentionSmem<acc_t>;  // cuda/attention_tile.cuh

// One online-softmax step over a tile already in shared memory. Column j of
// query m reads tile row `stream_tile ? m * ncols + j : j`.
template <int PER, typename acc_t>
__device__ __forceinline__ void softmax_tile(Smem<acc_t>& sm, acc_t (&acc)[PER], int64_t M, int64_t D,
                             int TN, int ncols, bool stream_tile) {
  // 1. Scores s = (scale q_m) . k_row, -inf for invalid rows.
  for (int i = threadIdx.x; i < M * ncols; i += kThreads) {
    const int m = i / ncols, j = i % ncols;
    const int row = stream_tile ? m * ncols + j : j;
    acc_t s = neg_inf<acc_t>();
    if (sm.valid[row]) {
      const acc_t* qm = sm.q + m * D;
      const acc_t* kr = sm.k + row * (D + 1);
      s = serial_dot(qm, kr, D);
    }
    sm.p[m * TN + j] = s;
  }
  __syncthreads();
  softmax_update_rows<kThreads>(sm, acc, M, D, TN, ncols, stream_tile);  // cuda/attention_tile.cuh
}

template <typename scalar_t, typename acc_t, int PER>
__global__ void __launch_bounds__(kThreads)
    stream_attention_fwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ kp,
                                const scalar_t* __restrict__ vp, const scalar_t* __restrict__ ks,
                                const scalar_t* __restrict__ vs, const bool* __restrict__ mask,
                                int64_t H, int64_t M, int64_t N, int64_t S, int64_t D, int TN,
                                acc_t scale, scalar_t* __restrict__ o, acc_t* __restrict__ lse) {
  extern __shared__ unsigned char smem_raw[];
  Smem<acc_t> sm(smem_raw, M, D, TN);
  const int64_t bh = blockIdx.x;  // b * H + h
  const int64_t b = bh / H;

  for (int64_t e = threadIdx.x; e < M * D; e += kThreads)
    sm.q[e] = scale * static_cast<acc_t>(q[bh * M * D + e]);
  for (int64_t m = threadIdx.x; m < M; m += kThreads) {
    sm.mx[m] = neg_inf<acc_t>();
    sm.l[m] = 0;
  }
  acc_t acc[PER];
#pragma unroll
  for (int i = 0; i < PER; ++i) acc[i] = 0;

  // Shared prefix: tiles of TN keys, loaded once for all M queries.
  const scalar_t* kp_bh = kp + bh * N * D;
  const scalar_t* vp_bh = vp + bh * N * D;
  for (int64_t n0 = 0; n0 < N; n0 += TN) {
    const int rows = static_cast<int>(N - n0 < TN ? N - n0 : TN);
    for (int r = threadIdx.x; r < TN; r += kThreads)
      sm.valid[r] = r < rows && (mask == nullptr || mask[b * N + n0 + r]);
    __syncthreads();
    for (int64_t e = threadIdx.x; e < rows * D; e += kThreads) {
      const int64_t r = e / D, c = e % D;
      const bool ok = sm.valid[r];
      sm.k[r * (D + 1) + c] = ok ? static_cast<acc_t>(kp_bh[(n0 + r) * D + c]) : acc_t(0);
      sm.v[r * D + c] = ok ? static_cast<acc_t>(vp_bh[(n0 + r) * D + c]) : acc_t(0);
    }
    __syncthreads();
    softmax_tile<PER>(sm, acc, M, D, TN, rows, false);
  }

  // Own streams: tiles of TS = TN / M steps per stream, row m * TS + j.
  const int TS = static_cast<int>(TN / M);
  const scalar_t* ks_bh = ks + bh * M * S * D;
  const scalar_t* vs_bh = vs + bh * M * S * D;
  for (int64_t s0 = 0; s0 < S; s0 += TS) {
    const int cols = static_cast<int>(S - s0 < TS ? S - s0 : TS);
    for (int r = threadIdx.x; r < M * cols; r += kThreads) sm.valid[r] = 1;
    for (int64_t e = threadIdx.x; e < M * cols * D; e += kThreads) {
      const int64_t r = e / D, c = e % D;
      const int64_t m = r / cols, j = r % cols;
      const int64_t g = ((m * S) + s0 + j) * D + c;
      sm.k[r * (D + 1) + c] = static_cast<acc_t>(ks_bh[g]);
      sm.v[r * D + c] = static_cast<acc_t>(vs_bh[g]);
    }
    __syncthreads();
    softmax_tile<PER>(sm, acc, M, D, TN, cols, true);
  }

  // o = acc / l, lse = mx + log l (l > 0: the own stream is never masked).
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int64_t e = threadIdx.x + static_cast<int64_t>(i) * kThreads;
    if (e < M * D) {
      const acc_t l = sm.l[e / D];
      o[bh * M * D + e] = static_cast<scalar_t>(l > 0 ? acc[i] / l : acc_t(0));
    }
  }
  for (int64_t m = threadIdx.x; m < M; m += kThreads)
    lse[bh * M + m] = sm.l[m] > 0 ? sm.mx[m] + log_acc(sm.l[m]) : neg_inf<acc_t>();
}

// The checks every backend shares (stream_attention.h), after the limits of
// this inference-only kernel.
void check_cuda_inputs(const at::Tensor& q, const at::Tensor& k_prefix, const at::Tensor& v_prefix,
                       const at::Tensor& k_stream, const at::Tensor& v_stream,
                       const std::optional<at::Tensor>& prefix_mask, double scale, double dropout_p,
                       const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(dropout_p == 0.0,
              "stream_attention_fwd (CUDA): dropout_p must be 0, the CUDA kernel is inference-only "
              "(use backend='triton' for attention dropout), got dropout_p = ", dropout_p);
  const auto shape = check_stream_attention_inputs("stream_attention_fwd", q, k_prefix, v_prefix, k_stream,
                                                   v_stream, prefix_mask, scale, dropout_p, seed);
  TORCH_CHECK(shape.M >= 1 && shape.M <= kMaxStreams, "stream_attention_fwd (CUDA): the number of streams M "
              "must lie in [1, ", kMaxStreams, "], got M = ", shape.M);
  TORCH_CHECK(shape.D >= 1 && shape.D <= kMaxHeadDim, "stream_attention_fwd (CUDA): the head dim D must lie "
              "in [1, ", kMaxHeadDim, "], got D = ", shape.D);
}

std::tuple<at::Tensor, at::Tensor> stream_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k_prefix, const at::Tensor& v_prefix,
    const at::Tensor& k_stream, const at::Tensor& v_stream,
    const std::optional<at::Tensor>& prefix_mask, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  check_cuda_inputs(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), D = q.size(3);
  const int64_t N = k_prefix.size(2), S = k_stream.size(3);
  const auto stat_type = acc_scalar_type(q.scalar_type());
  auto o = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({B, H, M}, q.options().dtype(stat_type));
  if (B * H == 0) return {o, lse};
  TORCH_CHECK(B * H <= 0x7fffffff, "stream_attention_fwd (CUDA): B * H must be < 2^31, got ",
              B * H);
  auto qc = q.contiguous(), kpc = k_prefix.contiguous(), vpc = v_prefix.contiguous();
  auto ksc = k_stream.contiguous(), vsc = v_stream.contiguous();
  at::Tensor maskc;
  if (prefix_mask.has_value()) maskc = prefix_mask->contiguous();
  const int64_t max_smem = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "stream_attention_fwd_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    // 32 prefix rows per tile (one per lane in the softmax step), 16 when
    // shared memory is short (fp64 with large M * D); TN >= M keeps TS >= 1.
    int TN = 32;
    if (Smem<acc_t>::bytes(M, D, TN) > max_smem) TN = 16;
    const int64_t smem = Smem<acc_t>::bytes(M, D, TN);
    TORCH_CHECK(smem <= max_smem, "stream_attention_fwd (CUDA): needs ", smem,
                " bytes of shared memory, the device has ", max_smem, " (M = ", M, ", D = ", D, ")");
    auto* kernel = M * D <= kPerThreadSmall * kThreads
                       ? stream_attention_fwd_kernel<scalar_t, acc_t, kPerThreadSmall>
                       : stream_attention_fwd_kernel<scalar_t, acc_t, kPerThreadLarge>;
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    }
    kernel<<<static_cast<unsigned int>(B * H), kThreads, smem, stream>>>(
        qc.const_data_ptr<scalar_t>(), kpc.const_data_ptr<scalar_t>(),
        vpc.const_data_ptr<scalar_t>(), ksc.const_data_ptr<scalar_t>(),
        vsc.const_data_ptr<scalar_t>(), maskc.defined() ? maskc.const_data_ptr<bool>() : nullptr,
        H, M, N, S, D, TN, static_cast<acc_t>(scale), o.mutable_data_ptr<scalar_t>(),
        lse.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {o, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(plr_kernels, CUDA, m) {
  m.impl("stream_attention_fwd", &stream_attention_fwd_cuda);
}

}  // namespace plr_kernels
