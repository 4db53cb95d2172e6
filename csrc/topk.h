// Input checks of plr_kernels::topk, shared by the CPU (topk.cpp) and CUDA
// (cuda/topk.cu) kernels so both reject the same inputs with the same
// messages; each kernel adds the limits of its own device.
#pragma once

#include <torch/types.h>

namespace plr_kernels {

inline void check_topk_inputs(const at::Tensor& z, const at::Tensor& item_emb, int64_t k,
                              int64_t exclude_index, const std::optional<at::Tensor>& exclude_items) {
  TORCH_CHECK(z.dim() == 2, "topk: z must be 2-D [B, d], got shape ", z.sizes());
  TORCH_CHECK(item_emb.dim() == 2 && item_emb.size(1) == z.size(1),
              "topk: item_emb must have shape [V, d] with d = ", z.size(1), " (as z), got ",
              item_emb.sizes());
  const auto st = z.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
              "topk: z must be float32, float64, bfloat16 or float16, got ", st);
  TORCH_CHECK(item_emb.scalar_type() == st, "topk: item_emb must have the dtype of z (", st,
              "), got ", item_emb.scalar_type());
  TORCH_CHECK(item_emb.device() == z.device(), "topk: z and item_emb must be on the same device, got ",
              z.device(), " and ", item_emb.device());
  const int64_t V = item_emb.size(0);
  TORCH_CHECK(k >= 1 && k <= V, "topk: k must lie in [1, V] = [1, ", V, "], got ", k);
  TORCH_CHECK(exclude_index >= -1 && exclude_index < V,
              "topk: exclude_index must be an item id in [0, V) = [0, ", V, ") or -1 (none), got ",
              exclude_index);
  if (exclude_items.has_value()) {
    const auto& ex = *exclude_items;
    TORCH_CHECK(ex.scalar_type() == at::kLong, "topk: exclude_items must be int64, got ",
                ex.scalar_type());
    TORCH_CHECK(ex.dim() == 2 && ex.size(0) == z.size(0),
                "topk: exclude_items must have shape [B, L] with B = ", z.size(0), ", got ",
                ex.sizes());
    TORCH_CHECK(ex.device() == z.device(), "topk: exclude_items must be on ", z.device(), ", got ",
                ex.device());
    if (ex.numel() > 0) {
      const int64_t mx = ex.max().item<int64_t>();  // one reduction (a device sync on CUDA)
      TORCH_CHECK(mx < V, "topk: exclude_items entries must be < V = ", V,
                  " (negative entries are padding), got ", mx);
    }
  }
}

}  // namespace plr_kernels
