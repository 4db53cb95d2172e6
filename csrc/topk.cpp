// CPU kernel of plr_kernels::topk (plr_kernels/topk.py): the k best items of each
// row by score s(b,v) = z_b . e_v, streamed over tiles of the item table, in
// O(B k) memory (never the [B x V] score matrix).
//
// Order: higher score first, equal scores by smaller item id -- a total order
// on (score, id), so the result does not depend on how the items are split
// between threads. Candidates exclude exclude_index and the non-negative ids
// of exclude_items[b] (negative entries are padding), as in target_rank, and
// items scoring NaN. A row with fewer than k candidates ends in (-inf, -1). Scores accumulate in float
// (double for fp64), the returned values too (bf16/fp16 scores are fp32, as in
// the reference).
//
// Work split (csrc/common.h): tasks = (block of rows) x (chunk of items). Large batches fill
// the threads with row blocks (one chunk); a single request (B = 1, serving)
// splits the items into chunks whose per-row top-k are merged at the end.
// Within a task each row keeps a bounded heap of its k best (worst on top); an
// item's exclusion is only looked up when it would enter the heap.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "common.h"
#include "topk.h"

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

namespace plr_kernels {
namespace {

constexpr int kGroup = 4;                 // rows scored together against each item row
constexpr int64_t kRowBlock = 16;         // rows sharing each tile of items
constexpr int64_t kTileBytes = 64 << 10;  // a tile of (widened) item rows stays in L2
constexpr int64_t kMinItemsPerChunk = 2048;

template <typename acc_t>
struct Entry {
  acc_t score;
  int64_t id;
};

// a ranks before b: higher score, then smaller id.
template <typename acc_t>
inline bool before(const Entry<acc_t>& a, const Entry<acc_t>& b) {
  return a.score > b.score || (a.score == b.score && a.id < b.id);
}

// The k best of one row within one task: a heap ordered by `before`, whose
// top is the worst entry kept.
template <typename acc_t>
struct RowHeap {
  Entry<acc_t>* data;
  int64_t size = 0;

  // A NaN score is no candidate (it would break the heap's order).
  bool wants(acc_t s, int64_t v, int64_t k) const {
    return s == s && (size < k || before(Entry<acc_t>{s, v}, data[0]));
  }
  void offer(acc_t s, int64_t v, int64_t k) {
    auto cmp = before<acc_t>;
    if (size < k) {
      data[size++] = {s, v};
      std::push_heap(data, data + size, cmp);
    } else {
      std::pop_heap(data, data + size, cmp);
      data[size - 1] = {s, v};
      std::push_heap(data, data + size, cmp);
    }
  }
};

template <typename scalar_t>
void topk_kernel(const scalar_t* z_in, const scalar_t* E, int64_t k, int64_t exclude_index, const int64_t* ex,
                 int64_t L, int64_t B, int64_t V, int64_t d,
                 acc_type<scalar_t>* values, int64_t* ids) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool widen = !std::is_same_v<acc_t, scalar_t>;

  std::vector<acc_t> z(static_cast<size_t>(B * d));
  for (int64_t i = 0; i < B * d; ++i) z[i] = static_cast<acc_t>(z_in[i]);

  const WorkSplit split = split_rows_by_items(B, V, kRowBlock, kMinItemsPerChunk, at::get_num_threads());
  const int64_t n_row_blocks = split.row_blocks, n_chunks = split.chunks, chunk = split.chunk;
  const int64_t tile = std::max<int64_t>(16, kTileBytes / std::max<int64_t>(1, d * sizeof(acc_t)));

  // Per (chunk, row): up to k entries, best first, and their count.
  std::vector<Entry<acc_t>> found(static_cast<size_t>(n_chunks * B * k));
  std::vector<int64_t> n_found(static_cast<size_t>(n_chunks * B), 0);

#pragma omp parallel
  {
    std::vector<acc_t> ebuf(widen ? tile * d : 0);
    std::vector<acc_t> scores(kRowBlock * tile);
    std::vector<int64_t> banned;  // sorted excluded ids of one row
    std::vector<size_t> banned_begin(kRowBlock + 1);
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t rb = 0; rb < n_row_blocks; ++rb) {
      for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t b0 = rb * kRowBlock, nr = std::min(kRowBlock, B - b0);
        const int64_t v0 = c * chunk, v1 = std::min(V, v0 + chunk);
        // The rows' excluded ids, sorted per row (looked up by binary search).
        banned.clear();
        for (int64_t r = 0; r < nr; ++r) {
          banned_begin[r] = banned.size();
          for (int64_t l = 0; l < L; ++l) {
            if (ex[(b0 + r) * L + l] >= 0) banned.push_back(ex[(b0 + r) * L + l]);
          }
          std::sort(banned.begin() + banned_begin[r], banned.end());
        }
        banned_begin[nr] = banned.size();
        auto excluded = [&](int64_t r, int64_t v) {
          return v == exclude_index ||
                 std::binary_search(banned.begin() + banned_begin[r], banned.begin() + banned_begin[r + 1], v);
        };
        Entry<acc_t>* slots = found.data() + (c * B + b0) * k;
        RowHeap<acc_t> heaps[kRowBlock];
        for (int64_t r = 0; r < nr; ++r) heaps[r].data = slots + r * k;

        for (int64_t t0 = v0; t0 < v1; t0 += tile) {
          const int64_t nt = std::min(tile, v1 - t0);
          const acc_t* et;
          if constexpr (widen) {
            const scalar_t* src = E + t0 * d;
            for (int64_t i = 0; i < nt * d; ++i) ebuf[i] = static_cast<acc_t>(src[i]);
            et = ebuf.data();
          } else {
            et = E + t0 * d;
          }
          for (int64_t v = 0; v < nt; ++v) {
            int64_t r = 0;
            for (; r + kGroup <= nr; r += kGroup) {
              acc_t s[kGroup];
              dot_rows<kGroup>(z.data() + (b0 + r) * d, et + v * d, d, s);
              for (int i = 0; i < kGroup; ++i) scores[(r + i) * tile + v] = s[i];
            }
            for (; r < nr; ++r) dot_rows<1>(z.data() + (b0 + r) * d, et + v * d, d, &scores[r * tile + v]);
          }
          for (int64_t r = 0; r < nr; ++r) {
            const acc_t* sr = scores.data() + r * tile;
            for (int64_t v = 0; v < nt; ++v) {
              if (heaps[r].wants(sr[v], t0 + v, k) && !excluded(r, t0 + v)) heaps[r].offer(sr[v], t0 + v, k);
            }
          }
        }
        for (int64_t r = 0; r < nr; ++r) {
          std::sort_heap(heaps[r].data, heaps[r].data + heaps[r].size, before<acc_t>);
          n_found[c * B + b0 + r] = heaps[r].size;
        }
      }
    }

    // Merge the chunks of each row: the k first of their union, (-inf, -1) after.
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      std::vector<Entry<acc_t>> all;
      const Entry<acc_t>* best = found.data() + b * k;
      int64_t n = n_found[b];
      if (n_chunks > 1) {
        for (int64_t c = 0; c < n_chunks; ++c) {
          const Entry<acc_t>* src = found.data() + (c * B + b) * k;
          all.insert(all.end(), src, src + n_found[c * B + b]);
        }
        n = std::min<int64_t>(k, all.size());
        std::partial_sort(all.begin(), all.begin() + n, all.end(), before<acc_t>);
        best = all.data();
      }
      for (int64_t i = 0; i < k; ++i) {
        values[b * k + i] = i < n ? best[i].score : -std::numeric_limits<acc_t>::infinity();
        ids[b * k + i] = i < n ? best[i].id : -1;
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> topk_cpu(const at::Tensor& z, const at::Tensor& item_emb, int64_t k,
                                            int64_t exclude_index, const std::optional<at::Tensor>& exclude_items) {
  check_topk_inputs(z, item_emb, k, exclude_index, exclude_items);
  TORCH_CHECK(z.device().is_cpu(), "topk: z and item_emb must be CPU tensors, got ", z.device());
  const int64_t B = z.size(0), V = item_emb.size(0), d = z.size(1);
  const auto acc = acc_scalar_type(z.scalar_type());
  auto values = at::empty({B, k}, z.options().dtype(acc));
  auto ids = at::empty({B, k}, z.options().dtype(at::kLong));
  if (B == 0) return {values, ids};
  auto zc = z.contiguous();
  auto ec = item_emb.contiguous();
  at::Tensor exc;
  int64_t L = 0;
  if (exclude_items.has_value()) {
    exc = exclude_items->contiguous();
    L = exc.size(1);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "topk_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    topk_kernel<scalar_t>(zc.const_data_ptr<scalar_t>(), ec.const_data_ptr<scalar_t>(), k, exclude_index,
                          L > 0 ? exc.const_data_ptr<int64_t>() : nullptr, L, B, V, d,
                          values.mutable_data_ptr<acc_t>(), ids.mutable_data_ptr<int64_t>());
  });
  return {values, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(plr_kernels, CPU, m) { m.impl("topk", &topk_cpu); }

}  // namespace plr_kernels
