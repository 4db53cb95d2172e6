// CPU kernels of plr_kernels::vocab_forward / vocab_backward (plr_kernels/vocab_pass.py):
// softmax statistics of rows x_r over the item table E, streamed over tiles of
// items, without a [R x V] logit matrix. The semantics are those of the Triton
// kernels (plr_kernels/triton/vocab_pass.py).
//
// Forward, with l_r(v) = x_r.e_v / tau and the excluded item at l = -inf:
//   lse_r = logsumexp_v l_r(v),   mu_r = sum_v p_r(v) e_v,   t_r = l_r(y_r)
// by an online softmax per row: over the tiles of E keep the running max m,
// the running sum s = sum_v exp(l(v) - m) and a = sum_v exp(l(v) - m) e_v; a
// new tile with max m' rescales s and a by exp(m - m'). At the end
// lse = m + log s, mu = a / s (PLR Eq. 7 and Eq. 11 need only these).
//
// Backward (FlashAttention style), for upstream gradients g_lse [R],
// g_mu [R,d], g_t [R] and c_r = g_mu_r.mu_r, the gradient on the logits is
//   G_r(v) = p_r(v) (g_lse_r + g_mu_r.e_v - c_r) + g_t_r [v = y_r]
// (d lse/d l(v) = p(v), d mu/d l(v) = p(v)(e_v - mu): the softmax covariance),
// with p_r(v) = exp(l_r(v) - lse_r) recomputed tile by tile. Then
//   dx_r = sum_v G_r(v) e_v / tau
//   dE_v = sum_r G_r(v) x_r / tau  (+ sum_r p_r(v) g_mu_r: the direct term of
//          mu on e_v, dropped when mu_direct is false -- the stop-gradient KL)
// dx is computed in parallel over blocks of rows, dE in parallel over tiles of
// items (each thread owns its tile of dE and loops over all rows): no atomics,
// and the summation order of every output is fixed by the tiling alone, so the
// results are bit-identical from run to run and for any number of threads.
//
// Accumulation in float (double for fp64 inputs); item rows are copied (bf16 /
// fp16 widened) tile by tile into a small per-thread buffer. The products of a
// row block with a tile (logits, sum p e, G e, G^T x) go to torch's CPU matmul
// on these buffers, and the exponentials and row sums of a tile to torch's
// vectorised exp and sum, single-threaded inside each OpenMP task; the rest of
// the online softmax and of the logit gradients are the loops below.
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"

namespace plr_kernels {
namespace {

constexpr int64_t kRowBlock = 64;          // rows sharing each tile of items
constexpr int64_t kTileBytes = 128 << 10;  // a tile of (widened) item rows stays in L2
constexpr int64_t kMinTile = 16, kMaxTile = 512;

int64_t tile_items(int64_t d, size_t acc_bytes) {
  const int64_t fit = kTileBytes / std::max<int64_t>(1, d * static_cast<int64_t>(acc_bytes));
  return std::clamp<int64_t>(fit, kMinTile, kMaxTile);
}

// Per-thread scratch arrays carved out of one tensor allocated before the
// parallel region (nothing inside it may throw): each thread's part and each
// array start on a 64-byte boundary, since BLAS results may depend on the
// alignment of the operands, and every operand lives in one of these.
template <typename T>
class Scratch {
 public:
  Scratch(std::initializer_list<int64_t> sizes, int threads) : threads_(threads) {
    for (int64_t n : sizes) {
      offsets_.push_back(per_thread_);
      per_thread_ += (n + kAlign - 1) / kAlign * kAlign;
    }
    data_ = at::empty({threads * per_thread_}, at::dtype(c10::CppTypeToScalarType<T>::value));
  }
  // Array i of the calling thread.
  T* get(int i) const { return data_.data_ptr<T>() + omp_get_thread_num() * per_thread_ + offsets_[i]; }
  int threads() const { return threads_; }

 private:
  static constexpr int64_t kAlign = 64 / sizeof(T) < 1 ? 1 : 64 / sizeof(T);
  int threads_;
  int64_t per_thread_ = 0;
  std::vector<int64_t> offsets_;
  at::Tensor data_;  // the CPU allocator aligns to 64 bytes
};

// The products of a row block with an item tile go to torch's CPU matmul (MKL
// or OpenBLAS where torch has them) on views of the scratch arrays. Inside our
// OpenMP tasks it runs single-threaded, and its summation order depends on the
// shapes and the (fixed) alignment only.
template <typename T>
inline at::Tensor view(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1},
                       at::dtype(c10::CppTypeToScalarType<T>::value));
}

// Row-major L[r * ld + v] = x_r . e_v for nr rows x [nr,d] and nt items e [nt,d].
template <typename T>
inline void block_dots(const T* x, int64_t nr, const T* e, int64_t nt, int64_t d, T* L, int64_t ld) {
  auto out = view(L, nr, nt, ld);
  at::mm_out(out, view(x, nr, d, d), view(e, nt, d, d).t());
}

// Row-major Y [nr,d] += alpha * W [nr,nt] . E [nt,d] (W with row stride ld).
template <typename T>
inline void add_weighted_items(const T* w, int64_t nr, int64_t ld, const T* e, int64_t nt, int64_t d, T alpha,
                               T* y) {
  view(y, nr, d, d).addmm_(view(w, nr, nt, ld), view(e, nt, d, d), 1, alpha);
}

// Row-major D [nt,d] += alpha * W^T [nt,nr] . X [nr,d] (W [nr,nt] with row stride ld).
template <typename T>
inline void add_weighted_rows(const T* w, int64_t nr, int64_t ld, const T* x, int64_t nt, int64_t d, T alpha,
                              T* D) {
  view(D, nt, d, d).addmm_(view(w, nr, nt, ld).t(), view(x, nr, d, d), 1, alpha);
}

// In place, l = exp(l) on a row block x tile (row stride ld) with torch's CPU
// exp, which is vectorised (SLEEF, the best ISA of the machine at run time);
// a scalar std::exp loop here cost as much as the matmuls of the pass. Inside
// our OpenMP tasks it runs single-threaded; exp(-inf) = 0.
template <typename T>
inline void exp_in_place(T* l, int64_t nr, int64_t nt, int64_t ld) {
  view(l, nr, nt, ld).exp_();
}

// s[r] += sum_v l[r * ld + v] for nr rows of nt values (torch's vectorised sum;
// its order is fixed by the shape and strides); tmp holds nr values.
template <typename T>
inline void add_row_sums(const T* l, int64_t nr, int64_t nt, int64_t ld, T* tmp, T* s) {
  auto out = at::from_blob(tmp, {nr}, at::dtype(c10::CppTypeToScalarType<T>::value));
  at::sum_out(out, view(l, nr, nt, ld), {1});
  for (int64_t r = 0; r < nr; ++r) s[r] += tmp[r];
}

// Copies n rows of width d (widening bf16 / fp16 exactly) into a scratch buffer.
template <typename acc_t, typename src_t>
inline void load_rows(const src_t* src, int64_t n, int64_t d, acc_t* dst) {
  for (int64_t i = 0; i < n * d; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

// Logits of a row block against a tile, in place: l = x.e / tau, the excluded
// item at -inf.
template <typename T>
inline void scale_and_exclude(T* l, int64_t nr, int64_t nt, int64_t ld, T inv_tau, int64_t v0,
                              int64_t exclude_index) {
  const bool has_ex = exclude_index >= v0 && exclude_index < v0 + nt;
  for (int64_t r = 0; r < nr; ++r) {
    T* lr = l + r * ld;
    for (int64_t v = 0; v < nt; ++v) lr[v] *= inv_tau;
    if (has_ex) lr[exclude_index - v0] = -std::numeric_limits<T>::infinity();
  }
}

template <typename scalar_t>
void vocab_forward_kernel(const acc_type<scalar_t>* x, const scalar_t* E, const int64_t* target,
                          double temperature, int64_t exclude_index, int64_t R, int64_t V, int64_t d,
                          acc_type<scalar_t>* lse, acc_type<scalar_t>* mu, acc_type<scalar_t>* t_logit) {
  using acc_t = acc_type<scalar_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const acc_t inv_tau = static_cast<acc_t>(1.0 / temperature);
  const int64_t tile = tile_items(d, sizeof(acc_t));
  const int64_t n_blocks = (R + kRowBlock - 1) / kRowBlock;

  const Scratch<acc_t> scratch({kRowBlock * d, tile * d, kRowBlock * tile, kRowBlock * d, kRowBlock},
                               at::get_num_threads());

#pragma omp parallel num_threads(scratch.threads())
  {
    acc_t* const xb = scratch.get(0);  // the row block
    acc_t* const eb = scratch.get(1);  // the item tile
    acc_t* const lg = scratch.get(2);  // logits, then exp(l - m), of block x tile
    acc_t* const acc = scratch.get(3);  // running sum_v exp(l(v) - m) e_v
    acc_t* const tile_sum = scratch.get(4);  // sum_v exp(l(v) - m) over the tile
    acc_t m[kRowBlock], s[kRowBlock];
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t r0 = blk * kRowBlock, nr = std::min(kRowBlock, R - r0);
      load_rows(x + r0 * d, nr, d, xb);
      std::fill(acc, acc + nr * d, acc_t(0));
      for (int64_t r = 0; r < nr; ++r) {
        m[r] = kNegInf;
        s[r] = 0;
        t_logit[r0 + r] = 0;
      }
      for (int64_t v0 = 0; v0 < V; v0 += tile) {
        const int64_t nt = std::min(tile, V - v0);
        load_rows(E + v0 * d, nt, d, eb);
        block_dots(xb, nr, eb, nt, d, lg, tile);
        scale_and_exclude(lg, nr, nt, tile, inv_tau, v0, exclude_index);
        for (int64_t r = 0; r < nr; ++r) {
          acc_t* l = lg + r * tile;
          if (target != nullptr) {
            const int64_t y = target[r0 + r];
            if (y >= v0 && y < v0 + nt) t_logit[r0 + r] = l[y - v0];
          }
          acc_t tile_max = kNegInf;
          for (int64_t v = 0; v < nt; ++v) tile_max = std::max(tile_max, l[v]);
          const acc_t m_new = std::max(m[r], tile_max);
          if (m_new == kNegInf) continue;  // no valid item so far: the row stays -inf, exp gives 0
          // Rescale the running sums to the new max (exp(-inf) = 0 on the first tile).
          const acc_t alpha = std::exp(m[r] - m_new);
          if (alpha != acc_t(1)) {
            s[r] *= alpha;
            acc_t* ar = acc + r * d;
            for (int64_t k = 0; k < d; ++k) ar[k] *= alpha;
          }
          for (int64_t v = 0; v < nt; ++v) l[v] -= m_new;
          m[r] = m_new;
        }
        exp_in_place(lg, nr, nt, tile);  // exp(l - m): the unnormalised p, in place
        add_row_sums(lg, nr, nt, tile, tile_sum, s);
        // a_r += sum_v exp(l_r(v) - m_r) e_v for the whole block at once.
        add_weighted_items(lg, nr, tile, eb, nt, d, acc_t(1), acc);
      }
      for (int64_t r = 0; r < nr; ++r) {
        lse[r0 + r] = m[r] + std::log(s[r]);
        const acc_t inv_s = acc_t(1) / s[r];
        const acc_t* ar = acc + r * d;
        acc_t* mur = mu + (r0 + r) * d;
        for (int64_t k = 0; k < d; ++k) mur[k] = ar[k] * inv_s;
      }
    }
  }
}

// Per-row inputs of the backward, all in the accumulation type (null = absent).
template <typename acc_t>
struct RowGrads {
  const acc_t* x;      // [R,d]
  const acc_t* lse;    // [R]
  const acc_t* g_lse;  // [R]
  const acc_t* g_mu;   // [R,d]
  const acc_t* c;      // [R], g_mu . mu
  const acc_t* g_t;    // [R]
  const int64_t* target;
};

// On a row block x item tile: l holds the scaled logits and u the products
// g_mu_r.e_v on entry; on exit l holds G_r(v) and u holds p_r(v).
// (u is left as it was without g_mu: nothing reads it then.)
template <typename acc_t>
void grad_logits(const RowGrads<acc_t>& in, int64_t r0, int64_t nr, int64_t v0, int64_t nt,
                 int64_t ld, acc_t* l, acc_t* u) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t r = 0; r < nr; ++r) {
    acc_t* lr = l + r * ld;
    const acc_t lse = in.lse[r0 + r];
    if (lse == kNegInf) {  // every item excluded: p = 0 (not exp(-inf + inf))
      std::fill(lr, lr + nt, kNegInf);
    } else {
      for (int64_t v = 0; v < nt; ++v) lr[v] -= lse;  // -inf (an excluded item) stays -inf
    }
  }
  exp_in_place(l, nr, nt, ld);  // p_r(v)
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t row = r0 + r;
    acc_t* lr = l + r * ld;
    acc_t* ur = u + r * ld;
    const acc_t base = (in.g_lse ? in.g_lse[row] : acc_t(0)) - (in.g_mu ? in.c[row] : acc_t(0));
    if (in.g_mu != nullptr) {
      for (int64_t v = 0; v < nt; ++v) {
        const acc_t p = lr[v];
        lr[v] = p * (base + ur[v]);
        ur[v] = p;
      }
    } else {
      for (int64_t v = 0; v < nt; ++v) lr[v] *= base;
    }
    if (in.g_t != nullptr) {
      const int64_t y = in.target[row];
      if (y >= v0 && y < v0 + nt) lr[y - v0] += in.g_t[row];
    }
  }
}

template <typename scalar_t>
void vocab_backward_kernel(const RowGrads<acc_type<scalar_t>>& in, const scalar_t* E, double temperature,
                           int64_t exclude_index, bool mu_direct, int64_t R, int64_t V, int64_t d,
                           acc_type<scalar_t>* dx, scalar_t* dE) {  // dx null: not computed
  using acc_t = acc_type<scalar_t>;
  const acc_t inv_tau = static_cast<acc_t>(1.0 / temperature);
  const int64_t tile = tile_items(d, sizeof(acc_t));
  const int64_t n_blocks = (R + kRowBlock - 1) / kRowBlock;
  const int64_t n_tiles = (V + tile - 1) / tile;
  const bool direct = mu_direct && in.g_mu != nullptr;

  const Scratch<acc_t> scratch({kRowBlock * d, kRowBlock * d, tile * d, kRowBlock * tile, kRowBlock * tile,
                                 std::max(kRowBlock, tile) * d},
                                at::get_num_threads());

#pragma omp parallel num_threads(scratch.threads())
  {
    acc_t* const xb = scratch.get(0);   // the row block of x
    acc_t* const gb = scratch.get(1);   // the row block of g_mu
    acc_t* const eb = scratch.get(2);   // the item tile
    acc_t* const l = scratch.get(3);    // logits, then G, of block x tile
    acc_t* const u = scratch.get(4);    // g_mu.e, then p, of block x tile
    acc_t* const acc = scratch.get(5);  // dx of the row block / dE of the tile

    // Row block [r0, r0 + nr) into xb / gb.
    auto load_block = [&](int64_t r0, int64_t nr) {
      load_rows(in.x + r0 * d, nr, d, xb);
      if (in.g_mu != nullptr) load_rows(in.g_mu + r0 * d, nr, d, gb);
    };
    // G (in l) and p (in u) of the loaded row block against the loaded tile.
    auto tile_grads = [&](int64_t r0, int64_t nr, int64_t v0, int64_t nt) {
      block_dots(xb, nr, eb, nt, d, l, tile);
      scale_and_exclude(l, nr, nt, tile, inv_tau, v0, exclude_index);
      if (in.g_mu != nullptr) block_dots(gb, nr, eb, nt, d, u, tile);
      grad_logits(in, r0, nr, v0, nt, tile, l, u);
    };

    // dx_r = sum_v G_r(v) e_v / tau, parallel over row blocks.
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < (dx != nullptr ? n_blocks : 0); ++blk) {
      const int64_t r0 = blk * kRowBlock, nr = std::min(kRowBlock, R - r0);
      load_block(r0, nr);
      std::fill(acc, acc + nr * d, acc_t(0));
      for (int64_t v0 = 0; v0 < V; v0 += tile) {
        const int64_t nt = std::min(tile, V - v0);
        load_rows(E + v0 * d, nt, d, eb);
        tile_grads(r0, nr, v0, nt);
        add_weighted_items(l, nr, tile, eb, nt, d, acc_t(1), acc);
      }
      acc_t* out = dx + r0 * d;
      for (int64_t i = 0; i < nr * d; ++i) out[i] = acc[i] * inv_tau;
    }

    // dE_v = sum_r G_r(v) x_r / tau (+ p_r(v) g_mu_r), parallel over item tiles.
#pragma omp for schedule(dynamic, 1)
    for (int64_t ti = 0; ti < n_tiles; ++ti) {
      const int64_t v0 = ti * tile, nt = std::min(tile, V - v0);
      load_rows(E + v0 * d, nt, d, eb);
      std::fill(acc, acc + nt * d, acc_t(0));
      for (int64_t r0 = 0; r0 < R; r0 += kRowBlock) {
        const int64_t nr = std::min(kRowBlock, R - r0);
        load_block(r0, nr);
        tile_grads(r0, nr, v0, nt);
        add_weighted_rows(l, nr, tile, xb, nt, d, inv_tau, acc);
        if (direct) add_weighted_rows(u, nr, tile, gb, nt, d, acc_t(1), acc);
      }
      scalar_t* out = dE + v0 * d;
      for (int64_t i = 0; i < nt * d; ++i) out[i] = static_cast<scalar_t>(acc[i]);
    }
  }
}

// ---------------------------------------------------------------------------
// Host side: checks, conversion, allocation
// ---------------------------------------------------------------------------

void check_common(const char* op, const at::Tensor& x, const at::Tensor& item_emb,
                  const std::optional<at::Tensor>& target, double temperature, int64_t exclude_index) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [R, d], got shape ", x.sizes());
  TORCH_CHECK(item_emb.dim() == 2 && item_emb.size(1) == x.size(1), op,
              ": item_emb must have shape [V, d] with d = ", x.size(1), " (as x), got ", item_emb.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op,
              ": x must be float32, float64, bfloat16 or float16, got ", st);
  TORCH_CHECK(item_emb.scalar_type() == st, op, ": item_emb must have the dtype of x (", st, "), got ",
              item_emb.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && item_emb.device().is_cpu(), op,
              ": x and item_emb must be CPU tensors, got ", x.device(), " and ", item_emb.device());
  TORCH_CHECK(temperature > 0, op, ": temperature must be positive, got ", temperature);
  const int64_t V = item_emb.size(0);
  TORCH_CHECK(exclude_index >= -1 && exclude_index < V, op,
              ": exclude_index must be an item id in [0, V) = [0, ", V, ") or -1 (none), got ", exclude_index);
  if (target.has_value()) {
    const auto& t = *target;
    TORCH_CHECK(t.scalar_type() == at::kLong, op, ": target must be int64, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(0), op, ": target must have shape [R] = [", x.size(0),
                "], got ", t.sizes());
    TORCH_CHECK(t.device().is_cpu(), op, ": target must be a CPU tensor, got ", t.device());
    if (t.numel() > 0) {
      const int64_t lo = t.min().item<int64_t>(), hi = t.max().item<int64_t>();
      TORCH_CHECK(lo >= -1 && hi < V, op, ": target values must lie in [0, V) = [0, ", V,
                  ") or be -1 (none), got min ", lo, " and max ", hi);
    }
  }
}

// An optional per-row input of the backward as a contiguous acc-dtype tensor.
at::Tensor row_input(const char* name, const at::Tensor& t, at::IntArrayRef shape, at::ScalarType acc) {
  TORCH_CHECK(t.sizes() == shape, "vocab_backward: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "vocab_backward: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "vocab_backward: ", name,
              " must be a floating tensor, got ", t.scalar_type());
  return t.to(acc).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> vocab_forward_cpu(const at::Tensor& x, const at::Tensor& item_emb,
                                                                 const std::optional<at::Tensor>& target,
                                                                 double temperature, int64_t exclude_index,
                                                                 bool /*mu_direct: for the autograd only*/) {
  check_common("vocab_forward", x, item_emb, target, temperature, exclude_index);
  const int64_t R = x.size(0), d = x.size(1), V = item_emb.size(0);
  const auto acc = acc_scalar_type(x.scalar_type());
  auto opts = x.options().dtype(acc);
  auto lse = at::empty({R}, opts), mu = at::empty({R, d}, opts), t_logit = at::zeros({R}, opts);
  if (R == 0) return {lse, mu, t_logit};
  auto xa = x.to(acc).contiguous();  // rows converted once: O(R d)
  auto ec = item_emb.contiguous();
  at::Tensor tc = target.has_value() ? target->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "vocab_forward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    vocab_forward_kernel<scalar_t>(xa.const_data_ptr<acc_t>(), ec.const_data_ptr<scalar_t>(),
                                   tc.defined() ? tc.const_data_ptr<int64_t>() : nullptr, temperature,
                                   exclude_index, R, V, d, lse.mutable_data_ptr<acc_t>(),
                                   mu.mutable_data_ptr<acc_t>(), t_logit.mutable_data_ptr<acc_t>());
  });
  return {lse, mu, t_logit};
}

std::tuple<at::Tensor, at::Tensor> vocab_backward_cpu(
    const at::Tensor& x, const at::Tensor& item_emb, const std::optional<at::Tensor>& target,
    const at::Tensor& lse, const std::optional<at::Tensor>& g_lse, const std::optional<at::Tensor>& g_mu,
    const std::optional<at::Tensor>& c, const std::optional<at::Tensor>& g_t, double temperature,
    int64_t exclude_index, bool mu_direct, bool need_dx) {
  check_common("vocab_backward", x, item_emb, target, temperature, exclude_index);
  const int64_t R = x.size(0), d = x.size(1), V = item_emb.size(0);
  const auto acc = acc_scalar_type(x.scalar_type());
  TORCH_CHECK(!g_mu.has_value() || c.has_value(),
              "vocab_backward: c (= sum_d g_mu * mu) must be given with g_mu, got None");
  auto lse_a = row_input("lse", lse, {R}, acc);
  at::Tensor glse_a, gmu_a, c_a, gt_a;
  if (g_lse.has_value()) glse_a = row_input("g_lse", *g_lse, {R}, acc);
  if (g_mu.has_value()) {
    gmu_a = row_input("g_mu", *g_mu, {R, d}, acc);
    c_a = row_input("c", *c, {R}, acc);
  }
  // g_t only acts through the target logits: without target it has no effect.
  const bool has_gt = g_t.has_value() && target.has_value();
  if (has_gt) gt_a = row_input("g_t", *g_t, {R}, acc);
  auto xa = x.to(acc).contiguous();
  auto ec = item_emb.contiguous();
  at::Tensor tc = target.has_value() ? target->contiguous() : at::Tensor();
  // need_dx=false: dx is [0, d] and its pass over E is skipped (the autograd
  // computes it from mu when g_mu is absent, plr_kernels/vocab_pass.py).
  auto dx = at::empty({need_dx ? R : 0, d}, x.options().dtype(acc));
  auto dE = at::empty({V, d}, item_emb.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "vocab_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<acc_t>() : nullptr; };
    RowGrads<acc_t> in{ptr(xa), ptr(lse_a), ptr(glse_a), ptr(gmu_a), ptr(c_a), ptr(gt_a),
                       tc.defined() ? tc.const_data_ptr<int64_t>() : nullptr};
    vocab_backward_kernel<scalar_t>(in, ec.const_data_ptr<scalar_t>(), temperature, exclude_index, mu_direct,
                                    R, V, d, need_dx ? dx.mutable_data_ptr<acc_t>() : nullptr,
                                    dE.mutable_data_ptr<scalar_t>());
  });
  return {dx.to(x.scalar_type()), dE};
}

}  // namespace

TORCH_LIBRARY_IMPL(plr_kernels, CPU, m) {
  m.impl("vocab_forward", &vocab_forward_cpu);
  m.impl("vocab_backward", &vocab_backward_cpu);
}

}  // namespace plr_kernels
