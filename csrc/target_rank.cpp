// CPU kernel of plr_kernels::target_rank (DESIGN.md 4.3): the exact rank of
// each row's target among all candidate items, without materialising [B, V].
//
// rank[b] = 1 + #{candidate v : s(b,v) > s(b,target)}   (">=" when pessimistic)
// s(b,v) = z[b] . item_emb[v]; candidates exclude the target itself,
// exclude_index and the non-negative entries of exclude_items[b]. NaN: a NaN
// candidate beats nothing, a NaN target ranks last (as plr_kernels/reference.py).
//
// Every score, the target's included, comes from the one routine dot_rows()
// whose summation order is fixed by the source (explicit lanes, no
// reassociation, no FMA contraction), so an item whose embedding equals the
// target's ties with it bit for bit.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "target_rank.h"

namespace plr_kernels {
namespace {

constexpr int kLanes = 8;                  // partial sums per dot product
constexpr int kGroup = 4;                  // rows scored together against each item row
constexpr int64_t kRowBlock = 32;          // rows of z sharing each tile of items
constexpr int64_t kTileBytes = 128 << 10;  // a tile of item rows stays in L2 across the rows
constexpr int64_t kMinItemsPerTask = 1024;

// 16-byte vectors (SSE2, the x86-64 baseline; NEON on arm64): element-wise
// IEEE arithmetic, so they only make the compiler keep the lanes in registers.
template <typename T>
struct Vec16 {
  typedef T type __attribute__((vector_size(16)));
};

// kLanes item values as vectors of acc_t. Exact for every dtype (bf16 and fp16
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

// Scores of R rows of z (row stride d) against one item row e. Each row's
// score is the sum of kLanes partial sums (lane j takes k = j mod kLanes),
// combined pairwise in a fixed order. Every score in this file comes from
// here, and per row the operations and their order do not depend on R or on
// the call site, so an item whose embedding equals the target's ties with it
// bit for bit (setup.py also forbids FMA contraction: -ffp-contract=off).
// R rows at once give 2R independent accumulator chains and load e once.
template <int R, typename acc_t, typename scalar_t>
inline void dot_rows(const acc_t* __restrict__ z, const scalar_t* __restrict__ e, int64_t d,
                     acc_t* __restrict__ out) {
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

template <typename acc_t, typename scalar_t>
inline acc_t dot(const acc_t* z, const scalar_t* e, int64_t d) {
  acc_t s;
  dot_rows<1>(z, e, d, &s);
  return s;
}

// A NaN candidate beats nothing; a NaN target is beaten by everything, so it
// ranks last (1 + the number of candidates) and a diverged model never scores.
template <typename acc_t>
inline bool beats(acc_t s, acc_t t, bool pessimistic) {
  return (pessimistic ? s >= t : s > t) || t != t;
}

template <typename scalar_t>
void target_rank_kernel(const scalar_t* z_in, const scalar_t* E, const int64_t* target,
                        int64_t exclude_index, const int64_t* ex, int64_t L, bool pessimistic,
                        int64_t B, int64_t V, int64_t d, int64_t* out) {
  // float for fp32/bf16/fp16, double for fp64.
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

  // z converted once to the accumulation type; item rows are converted on the fly.
  std::vector<acc_t> z(static_cast<size_t>(B * d));
  std::vector<acc_t> t_score(B);
  std::vector<int64_t> count(B, 0);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < d; ++k) z[b * d + k] = static_cast<acc_t>(z_in[b * d + k]);
    t_score[b] = dot(z.data() + b * d, E + target[b] * d, d);
  }

  // Tasks = (block of rows) x (chunk of items): rows give the parallelism for
  // evaluation batches, item chunks keep every thread busy when B is small
  // (serving a single user). Within a task, tiles of items are reused from
  // cache by all the block's rows: item_emb is read from memory B / kRowBlock
  // times instead of B times.
  const int64_t n_row_blocks = (B + kRowBlock - 1) / kRowBlock;
  const int64_t threads = at::get_num_threads();  // torch's OpenMP runtime is ours too
  const int64_t max_chunks = std::max<int64_t>(1, V / kMinItemsPerTask);
  const int64_t n_chunks =
      std::min(max_chunks, std::max<int64_t>(1, (4 * threads + n_row_blocks - 1) / n_row_blocks));
  const int64_t chunk = (V + n_chunks - 1) / n_chunks;
  const int64_t tile = std::max<int64_t>(16, kTileBytes / std::max<int64_t>(1, d * sizeof(scalar_t)));

#pragma omp parallel for collapse(2) schedule(dynamic, 1)
  for (int64_t rb = 0; rb < n_row_blocks; ++rb) {
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t b0 = rb * kRowBlock, b1 = std::min(B, b0 + kRowBlock);
      const int64_t v0 = c * chunk, v1 = std::min(V, v0 + chunk);
      int64_t local[kRowBlock] = {};
      for (int64_t t0 = v0; t0 < v1; t0 += tile) {
        const int64_t t1 = std::min(v1, t0 + tile);
        // The target is counted here too when pessimistic and removed below
        // with the excluded items, keeping these loops free of id tests.
        int64_t b = b0;
        for (; b + kGroup <= b1; b += kGroup) {
          const acc_t* zb = z.data() + b * d;
          acc_t s[kGroup];
          for (int64_t v = t0; v < t1; ++v) {
            dot_rows<kGroup>(zb, E + v * d, d, s);
            for (int r = 0; r < kGroup; ++r) {
              local[b - b0 + r] += beats(s[r], t_score[b + r], pessimistic);
            }
          }
        }
        for (; b < b1; ++b) {
          const acc_t* zb = z.data() + b * d;
          int64_t n = 0;
          for (int64_t v = t0; v < t1; ++v) n += beats(dot(zb, E + v * d, d), t_score[b], pessimistic);
          local[b - b0] += n;
        }
      }
      for (int64_t b = b0; b < b1; ++b) {
#pragma omp atomic
        count[b] += local[b - b0];
      }
    }
  }

  // Remove the non-candidates that were counted: the target (pessimistic
  // only), exclude_index, and the distinct history items, each once.
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int64_t> drop;
    drop.reserve(L + 1);
    if (exclude_index >= 0 && exclude_index < V) drop.push_back(exclude_index);
    for (int64_t l = 0; l < L; ++l) {
      if (ex[b * L + l] >= 0) drop.push_back(ex[b * L + l]);
    }
    std::sort(drop.begin(), drop.end());
    drop.erase(std::unique(drop.begin(), drop.end()), drop.end());
    // The target met itself in the main loop (s == t bit for bit; a NaN target counts itself).
    int64_t c = count[b] - beats(t_score[b], t_score[b], pessimistic);
    const acc_t* zb = z.data() + b * d;
    for (int64_t u : drop) {
      if (u != target[b] && beats(dot(zb, E + u * d, d), t_score[b], pessimistic)) --c;
    }
    out[b] = 1 + c;
  }
}

at::Tensor target_rank_cpu(const at::Tensor& z, const at::Tensor& item_emb,
                           const at::Tensor& target, int64_t exclude_index,
                           const std::optional<at::Tensor>& exclude_items, bool pessimistic) {
  check_target_rank_inputs(z, item_emb, target, exclude_index, exclude_items);
  const int64_t B = z.size(0), V = item_emb.size(0), d = z.size(1);
  auto out = at::empty({B}, target.options());
  if (B == 0) return out;
  auto zc = z.contiguous();
  auto ec = item_emb.contiguous();
  auto tc = target.contiguous();
  at::Tensor exc;
  int64_t L = 0;
  if (exclude_items.has_value()) {
    exc = exclude_items->contiguous();
    L = exc.size(1);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "target_rank_cpu", [&] {
    target_rank_kernel<scalar_t>(zc.const_data_ptr<scalar_t>(), ec.const_data_ptr<scalar_t>(),
                                 tc.const_data_ptr<int64_t>(), exclude_index,
                                 L > 0 ? exc.const_data_ptr<int64_t>() : nullptr, L, pessimistic,
                                 B, V, d, out.mutable_data_ptr<int64_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(plr_kernels, CPU, m) { m.impl("target_rank", &target_rank_cpu); }

}  // namespace plr_kernels
