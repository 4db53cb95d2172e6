// CPU kernel of plr_kernels::target_rank (plr_kernels/target_rank.py): the exact rank of
// each row's target among all candidate items, without materialising [B, V].
//
// rank[b] = 1 + #{candidate v : s(b,v) > s(b,target)}   (">=" when pessimistic)
// s(b,v) = z[b] . item_emb[v]; candidates exclude the target itself,
// exclude_index and the non-negative entries of exclude_items[b]. NaN: a NaN
// candidate beats nothing, a NaN target ranks last (as plr_kernels/reference.py).
//
// Every score, the target's included, comes from the one routine dot_rows()
// of csrc/common.h, whose summation order is fixed by the source, so an item
// whose embedding equals the target's ties with it bit for bit.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.h"
#include "target_rank.h"

namespace plr_kernels {
namespace {

constexpr int kGroup = 4;                  // rows scored together against each item row
constexpr int64_t kRowBlock = 32;          // rows of z sharing each tile of items
constexpr int64_t kTileBytes = 128 << 10;  // a tile of item rows stays in L2 across the rows
constexpr int64_t kMinItemsPerTask = 1024;

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
  using acc_t = acc_type<scalar_t>;

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
  // torch's OpenMP runtime is ours too.
  const WorkSplit split = split_rows_by_items(B, V, kRowBlock, kMinItemsPerTask, at::get_num_threads());
  const int64_t n_row_blocks = split.row_blocks, n_chunks = split.chunks, chunk = split.chunk;
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
