// Input checks of plr_kernels::target_rank, shared by the CPU (target_rank.cpp)
// and CUDA (cuda/target_rank.cu) kernels so both reject the same inputs with
// the same messages.
#pragma once

#include <torch/types.h>

namespace plr_kernels {

inline void check_target_rank_inputs(const at::Tensor& z, const at::Tensor& item_emb,
                                     const at::Tensor& target, int64_t exclude_index,
                                     const std::optional<at::Tensor>& exclude_items) {
  TORCH_CHECK(z.dim() == 2, "target_rank: z must be 2-D [B, d], got shape ", z.sizes());
  TORCH_CHECK(item_emb.dim() == 2, "target_rank: item_emb must be 2-D [V, d], got shape ",
              item_emb.sizes());
  TORCH_CHECK(item_emb.size(1) == z.size(1), "target_rank: item_emb must have shape [V, d] with d = ",
              z.size(1), " (as z), got ", item_emb.sizes());
  const auto st = z.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
              "target_rank: z must be float32, float64, bfloat16 or float16, got ", st);
  TORCH_CHECK(item_emb.scalar_type() == st,
              "target_rank: item_emb must have the dtype of z (", st, "), got ",
              item_emb.scalar_type());
  TORCH_CHECK(target.scalar_type() == at::kLong, "target_rank: target must be int64, got ",
              target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == z.size(0),
              "target_rank: target must have shape [B] = [", z.size(0), "], got ",
              target.sizes());
  TORCH_CHECK(item_emb.device() == z.device() && target.device() == z.device(),
              "target_rank: z, item_emb and target must be on the same device, got ",
              z.device(), ", ", item_emb.device(), " and ", target.device());
  TORCH_CHECK(exclude_index >= -1, "target_rank: exclude_index must be an item id >= 0 or -1 "
              "(none), got ", exclude_index);
  const int64_t V = item_emb.size(0);
  if (target.numel() > 0) {
    // One reduction (a device sync on CUDA): an out-of-range target would
    // otherwise read outside item_emb.
    auto bad = at::logical_or(target < 0, target >= V).any().item<bool>();
    TORCH_CHECK(!bad, "target_rank: target values must lie in [0, V) = [0, ", V, "), got min ",
                target.min().item<int64_t>(), " and max ", target.max().item<int64_t>());
  }
  if (exclude_items.has_value()) {
    const auto& ex = *exclude_items;
    TORCH_CHECK(ex.scalar_type() == at::kLong, "target_rank: exclude_items must be int64, got ",
                ex.scalar_type());
    TORCH_CHECK(ex.dim() == 2 && ex.size(0) == z.size(0),
                "target_rank: exclude_items must have shape [B, L] with B = ", z.size(0),
                ", got ", ex.sizes());
    TORCH_CHECK(ex.device() == z.device(), "target_rank: exclude_items must be on ", z.device(),
                ", got ", ex.device());
    if (ex.numel() > 0) {
      const int64_t mx = ex.max().item<int64_t>();
      TORCH_CHECK(mx < V, "target_rank: exclude_items entries must be < V = ", V,
                  " (negative entries are padding), got ", mx);
    }
  }
}

}  // namespace plr_kernels
