// Expert shards, their gathering, and the gradient all-reduce of data parallelism.
#include "switchyard/train/parallel.h"

#include <cstring>
#include <vector>

namespace sy {

bool overlap_exchange(std::string_view mode, const ParallelGroup& grid) {
  if (mode == "on") return true;
  if (mode == "off") return false;
  if (mode == "auto") return grid.ep_spans_hosts();
  throw ConfigError(fmt::format("--overlap {}: expected on, off or auto", mode));
}

bool is_expert_weight(std::string_view name) {
  for (std::string_view w : {"moe.w1", "moe.w3", "moe.w2"})
    if (name.size() >= w.size() && name.substr(name.size() - w.size()) == w) return true;
  return false;
}

Tensor expert_shard(const Tensor& full, int64_t ep_rank, int64_t ep_size) {
  const int64_t E = full.dim(0);
  if (ep_size < 1 || E % ep_size != 0)
    throw ConfigError(fmt::format("{} experts over {} expert-parallel ranks: expected a rank "
                                  "count that divides the experts evenly",
                                  E, ep_size));
  std::vector<int64_t> shape = full.shape();
  shape[0] = E / ep_size;
  Tensor shard(shape, full.dtype());
  std::memcpy(shard.bytes(), full.bytes() + size_t(ep_rank) * shard.nbytes(), shard.nbytes());
  return shard;
}

void shard_experts(LmParams& p, const ParallelGroup& g) {
  for (auto& [name, t] : p.named())
    if (is_expert_weight(name)) *t = expert_shard(*t, g.ep_rank(), g.ep_size());
}

LmParams gather_experts(const LmParams& p, const ParallelGroup& g) {
  LmParams full = zeros_like(p);
  auto src = p.named();
  auto dst = full.named();
  for (size_t i = 0; i < src.size(); ++i) {
    const Tensor& s = *src[i].second;
    Tensor& d = *dst[i].second;
    if (!is_expert_weight(src[i].first)) {
      std::memcpy(d.bytes(), s.bytes(), s.nbytes());
      continue;
    }
    std::vector<int64_t> shape = s.shape();
    shape[0] *= g.ep_size();
    d = Tensor(shape, s.dtype());
    g.ep_allgather(s.bytes(), s.nbytes(), d.bytes());
  }
  return full;
}

void allreduce_gradients(LmParams& g, const ParallelGroup& grid) {
  // Two flat buffers, one collective each: many small all-reduces would cost a latency apiece.
  std::vector<float> dense, experts;
  auto named = g.named();
  for (auto& [name, t] : named) {
    std::vector<float>& buf = is_expert_weight(name) ? experts : dense;
    buf.insert(buf.end(), t->data<float>(), t->data<float>() + t->numel());
  }
  grid.world_allreduce_sum(dense);
  if (grid.dp_size() > 1) grid.dp_allreduce_sum(experts);
  const float scale = 1.0f / float(grid.world_size());
  size_t at_dense = 0, at_experts = 0;
  for (auto& [name, t] : named) {
    const bool expert = is_expert_weight(name);
    const float* src = expert ? experts.data() + at_experts : dense.data() + at_dense;
    float* v = t->data<float>();
    for (int64_t i = 0; i < t->numel(); ++i) v[i] = src[i] * scale;
    (expert ? at_experts : at_dense) += size_t(t->numel());
  }
}

}  // namespace sy
